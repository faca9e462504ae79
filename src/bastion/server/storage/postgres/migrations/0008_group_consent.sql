-- Group consent and cheap appends: the verified state at each group's head (so a new
-- change is checked against it alone), and the members a chain names who have not
-- joined (a pending or declined invitation, or one withheld because they blocked the
-- adder: the server delivers nothing of the group to them).
CREATE TABLE group_heads (
    group_id bytea PRIMARY KEY,
    seq bigint NOT NULL,
    state bytea NOT NULL
);
CREATE TABLE group_invites (
    group_id bytea NOT NULL,
    username text NOT NULL,
    inviter text NOT NULL,
    state text NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (group_id, username)
);
CREATE INDEX group_invites_by_user ON group_invites (username, state);

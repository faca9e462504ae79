-- Groups: each group's signed chain of changes, the member list derived from it,
-- and the ids of group messages already fanned out (retries are stored once).
CREATE TABLE group_changes (
    group_id bytea NOT NULL,
    seq bigint NOT NULL,
    change bytea NOT NULL,
    PRIMARY KEY (group_id, seq)
);
CREATE TABLE group_members (
    group_id bytea NOT NULL,
    username text NOT NULL,
    active boolean NOT NULL,
    PRIMARY KEY (group_id, username)
);
CREATE TABLE group_sent (
    sender_device text NOT NULL,
    client_msg_id bytea NOT NULL,
    server_ts bigint NOT NULL,
    PRIMARY KEY (sender_device, client_msg_id)
);
CREATE INDEX group_sent_by_time ON group_sent (server_ts);
CREATE INDEX group_members_by_user ON group_members (username, group_id);

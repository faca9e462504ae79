-- Operator state shared by every node: the organisation policy, invite codes
-- (SHA-256 hashes only) and the admin events every node applies and audits.
CREATE TABLE policy (
    key text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE invites (
    code_hash bytea PRIMARY KEY,
    uses_left integer NOT NULL CHECK (uses_left >= 0),
    expires_at bigint NOT NULL,
    created_at bigint NOT NULL
);

-- Each node reads the events after the last one it applied. Writers take a
-- self-conflicting lock on this table before inserting, so ids commit in order
-- and a reader never passes an id that commits later.
CREATE TABLE admin_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at bigint NOT NULL,
    action text NOT NULL,
    target text NOT NULL
);

-- Names this database, so a node's saved event position is never applied to another one.
CREATE TABLE admin_identity (
    id text PRIMARY KEY
);
INSERT INTO admin_identity (id) VALUES (gen_random_uuid()::text);

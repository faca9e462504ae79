-- Contacts: one row per direction of a pair (owner's state towards peer), and each
-- account's presence visibility. Nothing else about contacts reaches the server.
CREATE TABLE contacts (
    owner text NOT NULL,
    peer text NOT NULL,
    state text NOT NULL,
    note_id bytea,
    updated_at bigint NOT NULL,
    PRIMARY KEY (owner, peer)
);
CREATE TABLE contact_settings (
    username text PRIMARY KEY,
    invisible boolean NOT NULL
);

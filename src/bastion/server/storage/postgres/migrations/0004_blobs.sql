-- File blobs: metadata of uploaded ciphertext (the ciphertext itself is stored in files).
CREATE TABLE blobs (
    blob_id text PRIMARY KEY,
    owner text NOT NULL,
    size bigint NOT NULL,
    sha256 bytea NOT NULL,
    created_at bigint NOT NULL,
    complete boolean NOT NULL DEFAULT false
);

CREATE INDEX blobs_by_owner ON blobs (owner);
CREATE INDEX blobs_by_age ON blobs (created_at);

CREATE TABLE blob_recipients (
    blob_id text NOT NULL,
    username text NOT NULL,
    downloaded boolean NOT NULL DEFAULT false,
    PRIMARY KEY (blob_id, username)
);

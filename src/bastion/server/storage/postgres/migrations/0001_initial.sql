-- The relay's tables: accounts, devices, key stocks, message queues.
CREATE TABLE accounts (
    username text PRIMARY KEY,
    identity_key bytea NOT NULL,
    created_at bigint NOT NULL,
    disabled boolean NOT NULL DEFAULT false
);

CREATE TABLE devices (
    username text NOT NULL REFERENCES accounts (username),
    device_id text NOT NULL,
    ed25519 bytea NOT NULL,
    curve25519 bytea NOT NULL,
    created_at bigint NOT NULL,
    certificate bytea NOT NULL,
    fallback_key bytea,
    fallback_signature bytea,
    PRIMARY KEY (username, device_id)
);

CREATE TABLE one_time_keys (
    username text NOT NULL,
    device_id text NOT NULL,
    key bytea NOT NULL,
    signature bytea NOT NULL,
    PRIMARY KEY (username, device_id, key)
);

CREATE TABLE queue (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username text NOT NULL,
    device_id text NOT NULL,
    sender text NOT NULL,
    sender_device text NOT NULL,
    server_ts bigint NOT NULL,
    kind integer NOT NULL,
    body bytea NOT NULL
);
CREATE INDEX queue_by_device ON queue (username, device_id, seq);

CREATE TABLE sent (
    sender_device text NOT NULL,
    client_msg_id bytea NOT NULL,
    server_ts bigint NOT NULL,
    PRIMARY KEY (sender_device, client_msg_id)
);
CREATE INDEX sent_by_time ON sent (server_ts);

CREATE TABLE revoked_devices (
    device_id text PRIMARY KEY,
    username text NOT NULL
);

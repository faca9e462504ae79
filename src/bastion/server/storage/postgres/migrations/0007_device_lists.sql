-- The newest signed device list of each account (the account key signs it; the
-- relay only keeps the highest version and hands it out with key queries).
CREATE TABLE device_lists (
    username text PRIMARY KEY,
    identity_key bytea NOT NULL,
    version bigint NOT NULL CHECK (version >= 1),
    device_ids text NOT NULL,
    signature bytea NOT NULL
);

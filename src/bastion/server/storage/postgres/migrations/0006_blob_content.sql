-- File ciphertext for a cluster: any node serves any blob. Pieces of 1 MiB,
-- stored uncompressed and out of line (ciphertext does not compress), so a
-- 64 KiB read fetches only the slices it needs. Deleting a blob deletes its pieces.
CREATE TABLE blob_pieces (
    blob_id text NOT NULL REFERENCES blobs (blob_id) ON DELETE CASCADE,
    piece integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (blob_id, piece)
);
ALTER TABLE blob_pieces ALTER COLUMN data SET STORAGE EXTERNAL;

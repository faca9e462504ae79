"""End-to-end encrypted file transfer, client side: encryption, name sanitising,
scanning in quarantine and release. No network code lives here."""

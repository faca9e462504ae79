"""The file layer of end-to-end encrypted file transfer, on the client.

Streaming encryption of a file under its own key (:mod:`~bastion.files.cipher`),
the sanitising of a received name (:mod:`~bastion.files.names`), the scan of a
received file in quarantine (:mod:`~bastion.files.scan`, with the checks of
:mod:`~bastion.files.content_type`, :mod:`~bastion.files.archives`,
:mod:`~bastion.files.active`, :mod:`~bastion.files.signatures`, and ClamAV's
``clamd`` over its local unix socket when one is configured:
:mod:`~bastion.files.clamd`), and the quarantine folder a clean file is released
from (:mod:`~bastion.files.quarantine`). Uploads and downloads through the relay
are :mod:`bastion.client.files`: nothing here talks to the Bastion server.
"""

"""Every code the server puts in an ``error`` frame (docs/protocol.md §4.4).

The wire type stays the open pattern :data:`bastion.protocol.frames.ErrorCode`
(``^[a-z_]{1,32}\\Z``), so that a client keeps decoding the errors of a newer
server; this enum is the closed set that this server sends.
tests/protocol/test_codes.py checks it against the table in the docs and
against every code written at a call site in ``bastion.server``.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """A refusal code; the member's value is the string on the wire."""

    BAD_FRAME = "bad_frame"
    NOT_SIGNED_IN = "not_signed_in"
    AUTH_FAILED = "auth_failed"
    PROTOCOL = "protocol"
    RATE_LIMITED = "rate_limited"
    USERNAME_TAKEN = "username_taken"
    REGISTRATION_CLOSED = "registration_closed"
    INVITE_REQUIRED = "invite_required"
    BAD_INVITE = "bad_invite"
    QUEUE_FULL = "queue_full"
    LINK_FAILED = "link_failed"
    DEVICE_REFUSED = "device_refused"
    UNKNOWN_DEVICE = "unknown_device"
    BAD_DEVICE_LIST = "bad_device_list"
    STALE_DEVICE_LIST = "stale_device_list"
    BAD_REQUEST = "bad_request"
    UNKNOWN_USER = "unknown_user"
    BAD_RECIPIENT = "bad_recipient"
    DEVICE_MISMATCH = "device_mismatch"
    TOO_MANY_KEYS = "too_many_keys"
    NOT_RECEIVING = "not_receiving"
    REFUSED = "refused"
    FILE_TRANSFER_OFF = "file_transfer_off"
    FILE_TOO_LARGE = "file_too_large"
    QUOTA_EXCEEDED = "quota_exceeded"
    UNKNOWN_BLOB = "unknown_blob"
    BAD_OFFSET = "bad_offset"
    BLOB_MISMATCH = "blob_mismatch"
    NOT_A_CONTACT = "not_a_contact"
    NO_REQUEST = "no_request"
    BLOCKED = "blocked"
    TOO_MANY_CONTACTS = "too_many_contacts"
    BAD_ACTION = "bad_action"
    GROUP_CHANGE_REJECTED = "group_change_rejected"
    UNKNOWN_GROUP = "unknown_group"
    GROUP_CONFLICT = "group_conflict"
    NOT_A_MEMBER = "not_a_member"
    NOT_JOINED = "not_joined"
    NO_INVITATION = "no_invitation"
    INTERNAL = "internal"

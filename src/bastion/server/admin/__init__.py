"""Operator state: the registration policy, invites, reports and the live admin view."""

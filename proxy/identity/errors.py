"""The two ways identity fails: a caller that cannot be identified, and credential
material (a keys file, a JWKS, a certificate) that cannot be loaded."""

from __future__ import annotations


class IdentityError(Exception):
    """A caller refused: HTTP status, a stable code and a message the agent can act on."""

    def __init__(self, code: str, message: str, status: int = 401, *, retry_after: float | None = None,
                 bearer: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after
        # A bearer-token failure: the answer carries WWW-Authenticate (RFC 6750 §3).
        self.bearer = bearer


class CredentialsError(Exception):
    """Credential material that cannot be used; the message names the file and the fix."""

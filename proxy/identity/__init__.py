"""Who is calling and who is operating: the identity sources of the data plane (API
keys, JWTs verified against a JWKS, mTLS client certificates and their SPIFFE IDs),
the operators' tokens and roles of the admin plane, and the TLS contexts of both
listeners and of upstreams.

Everything here is verified in Python before the policy runs (the embedded engine
has no `io.jwt.*`). Credential material (keys files, JWKS files, certificates) is
loaded whole and swapped in one step on reload; on any error the old set stays.
Nothing here imports the pipeline: failures are `IdentityError`s that the identify
stage turns into rejections.
"""

from .authenticator import Authenticator, build_authenticator
from .errors import CredentialsError, IdentityError

__all__ = ["Authenticator", "build_authenticator", "CredentialsError", "IdentityError"]

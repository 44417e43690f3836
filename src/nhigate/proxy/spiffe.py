"""SPIFFE IDs from mTLS client certificates (X.509-SVIDs).

The TLS layer has already verified the chain against the configured client
CA; this module only extracts the identity, and refuses anything ambiguous:
an SVID carries exactly one URI SAN, and it must be a well-formed SPIFFE ID.
"""

from __future__ import annotations

import re

from cryptography import x509

MAX_SPIFFE_ID_LENGTH = 2048
_SCHEME = "spiffe://"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def is_spiffe_id(value: str) -> bool:
    """True for a well-formed SPIFFE ID per the SPIFFE ID spec.

    `spiffe://` (lower case) + trust domain of `[a-z0-9._-]` + optional path of
    non-empty `[A-Za-z0-9._-]` segments that are not `.` or `..`; no trailing
    slash, query, fragment, port, userinfo or percent-encoding.
    """
    if len(value) > MAX_SPIFFE_ID_LENGTH or not value.startswith(_SCHEME):
        return False
    rest = value[len(_SCHEME) :]
    trust_domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        return False
    if not slash:
        return True
    for segment in path.split("/"):
        if segment in (".", "..") or not _PATH_SEGMENT.fullmatch(segment):
            return False
    return True


def spiffe_id_from_peer_cert(der: bytes) -> str | None:
    """The SPIFFE ID of a DER-encoded client certificate, or None.

    None unless the certificate has exactly one URI SAN and that URI is a
    well-formed SPIFFE ID. Never raises for malformed certificates.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, TypeError, x509.ExtensionNotFound, x509.DuplicateExtension):
        return None
    if len(uris) != 1:
        return None
    uri = uris[0]
    return uri if is_spiffe_id(uri) else None

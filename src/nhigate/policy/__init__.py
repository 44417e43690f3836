"""The pure policy core: model, path normalisation, compiled index, decide().

Stdlib only (checked by import-linter). Shared by the controller (which
compiles grants into a `PolicyDocument`) and the proxy (which loads the
document, compiles it into a `Policy` and calls `decide()` per request).
"""

from nhigate.policy.decide import Explanation, GrantVerdict, decide, explain, who_can
from nhigate.policy.document import (
    DOCUMENT_API_VERSION,
    IdentityAssertion,
    IssuerConfig,
    LiveIdentities,
    LiveServiceAccount,
    PolicyDocument,
    ServiceConfig,
    TenantMapping,
    UpstreamCredential,
)
from nhigate.policy.encoding import (
    GrantReuse,
    PolicyDocumentError,
    decode_document,
    encode_document,
    make_document,
    pack_document,
    unpack_document,
)
from nhigate.policy.index import Policy, compile_policy
from nhigate.policy.model import (
    Decision,
    Delegation,
    Facts,
    Grant,
    Identity,
    IdentityKind,
    McpRule,
    RateLimit,
    Reason,
    Revocation,
    Rule,
    ServiceAccountRef,
    ServiceAccountSubject,
    SpiffeSubject,
    Subject,
    TokenSubject,
)
from nhigate.policy.paths import PathPattern, PathRejected, normalise_path

__all__ = [
    "DOCUMENT_API_VERSION",
    "Decision",
    "Delegation",
    "Explanation",
    "Facts",
    "Grant",
    "GrantReuse",
    "GrantVerdict",
    "Identity",
    "IdentityAssertion",
    "IdentityKind",
    "IssuerConfig",
    "LiveIdentities",
    "LiveServiceAccount",
    "McpRule",
    "PathPattern",
    "PathRejected",
    "Policy",
    "PolicyDocument",
    "PolicyDocumentError",
    "RateLimit",
    "Reason",
    "Revocation",
    "Rule",
    "ServiceAccountRef",
    "ServiceAccountSubject",
    "ServiceConfig",
    "SpiffeSubject",
    "Subject",
    "TenantMapping",
    "TokenSubject",
    "UpstreamCredential",
    "compile_policy",
    "decide",
    "decode_document",
    "encode_document",
    "explain",
    "make_document",
    "normalise_path",
    "pack_document",
    "unpack_document",
    "who_can",
]

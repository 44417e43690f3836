"""The access review: least privilege from evidence (docs/access-review.md).

Reads the proxy's audit JSON lines (`records`), folds them into bounded per-grant
usage (`usage`, with observed paths kept in `shapes`), judges the grants against it
(`findings`), proposes tightened RouteGrants (`proposal`) and renders the result
(`render`; pictures in `plots`, which needs the optional matplotlib). Everything but
`records.open_audit` and `plots` is pure; the CLI (`nhigate access-review`) is thin.
"""

"""`gtvp token`: check, read and rotate the operator's signed verdict tokens (docs/tokens.md).

- `gtvp token verify TOKEN... --jwks FILE [--audience AUD] [--issuer ISS] [--min-level N]
  [--member NAME]`:
  offline, against a JWKS (the ConfigMap gtvp-verdict-jwks, or /.well-known/jwks.json); one
  line per token; exit 0 when every token is valid (and affirming at level >= N with
  --min-level), exit 1 naming the reason otherwise (expired, unknown-key, bad-signature,
  wrong-audience, below-level, ...). `-` reads a token from stdin.
- `gtvp token show TOKEN`: the decoded header and claims, NOT verified (it says so).
- `gtvp token rotate-key`: a new signing key in the Secret gtvp-verdict-keys (the old one
  stays published until every token it signed has expired).

verify and show import neither the Kubernetes client nor kopf.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from gtvp.core import ear


def _read_token(arg: str) -> str:
    return sys.stdin.read().strip() if arg == "-" else arg.strip()


def _read_jwks(path: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SystemExit(f"gtvp token verify: cannot read --jwks {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise SystemExit(f"gtvp token verify: --jwks {path} is not JSON") from exc
    if isinstance(value, dict) and isinstance(value.get("data"), dict):
        # a ConfigMap as `kubectl get -o json` prints it
        value = json.loads(str(value["data"].get("jwks.json", "{}")))
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        raise SystemExit(f"gtvp token verify: --jwks {path} is not a JWK Set ({{'keys': [...]}})")
    return value


def _check(
    token: str, key_set: dict[str, Any], args: argparse.Namespace, now: dt.datetime
) -> tuple[bool, str]:
    """(valid, one line): the token's summary, or why it is refused."""
    try:
        claims = ear.verify(token, key_set, audience=args.audience, issuer=args.issuer, now=now)
        found = ear.appraisals(claims)
    except ear.TokenRefused as refused:
        return False, f"refused ({refused.reason}): {refused}"
    if args.member is not None:
        found = [a for a in found if a.member == args.member]
        if not found:
            return False, f"refused (wrong-member): the token is not about member {args.member}"
    lines, ok = [], True
    for a in found:
        line = (
            f"{a.member}: {a.status}, level {a.level}, "
            f"expires {a.expires.strftime('%Y-%m-%dT%H:%M:%SZ')}, issuer {claims.get('iss')}"
        )
        if args.min_level is not None and (a.status != ear.AFFIRMING or a.level < args.min_level):
            ok = False
            line = f"refused (below-level): {line}; needs affirming at level >= {args.min_level}"
        lines.append(line)
    return ok, "; ".join(lines)


def verify(args: argparse.Namespace) -> int:
    key_set = _read_jwks(args.jwks)
    named = key_set.get("issuer")
    if args.issuer is not None and named is not None and named != args.issuer:
        print(
            f"gtvp token verify: --jwks {args.jwks} is the key set of issuer {named!r}, not "
            f"{args.issuer!r}: verify each cluster's tokens against that cluster's own key "
            "set (a merged one lets any of them sign as another)",
            file=sys.stderr,
        )
        return 1
    now = dt.datetime.now(dt.UTC)
    rc = 0
    for arg in args.tokens:
        ok, line = _check(_read_token(arg), key_set, args, now)
        print(line, file=sys.stdout if ok else sys.stderr)
        rc = rc if ok else 1
    return rc


def show(args: argparse.Namespace) -> int:
    try:
        parsed = ear.parse(_read_token(args.token))
    except ear.TokenRefused as refused:
        print(f"gtvp token show: {refused}", file=sys.stderr)
        return 1
    print("# NOT VERIFIED: decoded only (check it with: gtvp token verify TOKEN --jwks FILE)")
    print(json.dumps({"header": parsed.header, "claims": parsed.claims}, indent=2))
    return 0


def rotate_key(args: argparse.Namespace) -> int:
    from gtvp import kube, verdict_keys

    clients = kube.make_clients(args.kubeconfig)
    revoke = bool(args.revoke_previous)
    kid, published = verdict_keys.rotate(
        clients, args.namespace, dt.datetime.now(dt.UTC), revoke=revoke
    )
    kept = (
        "every earlier key withdrawn: tokens they signed no longer verify, and each member's "
        "token is signed anew at the operator's next look at it"
        if revoke
        else "a retired key is removed once every token it signed has expired"
    )
    print(
        f"new verdict signing key {kid}: the operator signs with it within "
        f"{int(verdict_keys.REFRESH.total_seconds())}s; published keys: {', '.join(published)} "
        f"({kept})"
    )
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """`gtvp token`'s sub-commands (gtvp.cli names the command)."""
    sub = p.add_subparsers(dest="token_cmd", metavar="{verify,show,rotate-key}")
    v = sub.add_parser("verify", help="check verdict tokens offline against a JWKS")
    v.add_argument("tokens", nargs="+", metavar="TOKEN", help="a token, or - for stdin")
    v.add_argument("--jwks", required=True, help="JWK Set file (or the ConfigMap as JSON)")
    v.add_argument("--audience", default="gtvp", help="expected 'aud' (default: gtvp)")
    v.add_argument(
        "--issuer",
        help="expected 'iss': the cluster the token must come from (gtvp.io/cluster/<uid of its"
        " kube-system namespace>; default: not checked)",
    )
    v.add_argument("--min-level", type=int, help="also require affirming at this level or higher")
    v.add_argument("--member", help="require the token to be about this member")
    v.set_defaults(func=verify)
    s = sub.add_parser("show", help="decode a token (NOT verified)")
    s.add_argument("token", metavar="TOKEN", help="a token, or - for stdin")
    s.set_defaults(func=show)
    r = sub.add_parser("rotate-key", help="start signing with a new key")
    r.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or in-cluster")
    r.add_argument(
        "--namespace", default="gtvp-system", help="the operator's namespace (default: gtvp-system)"
    )
    r.add_argument(
        "--revoke-previous",
        action="store_true",
        help="withdraw every earlier key at once (one may be stolen): tokens they signed no "
        "longer verify",
    )
    r.set_defaults(func=rotate_key)

"""Signed verdict tokens on the real API server: the operator's handlers driven in-process
(as in test_handlers_inprocess.py) with gtvp-agent's own code answering over a software TPM;
the signing keys in a real Secret, the JWKS in a real ConfigMap, under the chart's RBAC.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from gtvp import cli, kube, verdict_keys
from gtvp.core import ear
from gtvp.core.api_resources import MEMBERS, SECURITY_POLICIES
from gtvp.core.policy_status import Accepted
from gtvp.handlers import attestation, policies
from gtvp.runtime import OperatorSettings, Runtime
from gtvp_agent.agent import Agent, AgentConfig
from gtvp_agent.tpm import Tpm
from gtvp_local.controlplane import ADMIN, OPERATOR, ControlPlane, Identity
from gtvp_local.polling import wait_for
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import SwtpmCA
from tests.softmember import Bundle, policy_trusting
from tests.softtpm import SoftCA, SoftTpm

pytestmark = [pytest.mark.controlplane]

POLICY = "tokens"
REPO = Path(__file__).resolve().parents[2]


def _chart_role(namespace: str) -> list[dict[str, Any]]:
    """The chart's verdict-keys Role and a binding of it to the local operators' group."""
    text = (REPO / "charts/gtvp/templates/rbac.yaml").read_text()
    start = text.index("kind: Role\nmetadata:\n  name: gtvp-operator-verdict-keys")
    rules_yaml = text[text.index("rules:", start) : text.index("---", start)]
    import yaml

    rules = yaml.safe_load(rules_yaml)["rules"]
    rbac = "rbac.authorization.k8s.io"
    return [
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "Role",
            "metadata": {"name": "gtvp-operator-verdict-keys", "namespace": namespace},
            "rules": rules,
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "gtvp-operator-verdict-keys", "namespace": namespace},
            "subjects": [{"apiGroup": rbac, "kind": "Group", "name": "gtvp:operators"}],
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "gtvp-operator-verdict-keys"},
        },
    ]


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> kube.Clients:
    return kube.make_clients(str(control_plane.kubeconfig_for(ADMIN)))


@pytest.fixture
def keys_namespace(control_plane: ControlPlane, namespace: str) -> str:
    """A namespace where the operator holds exactly the chart's verdict-keys rights."""
    control_plane.kubectl(
        "apply", "-f", "-", input_text="\n---\n".join(json.dumps(d) for d in _chart_role(namespace))
    )

    def granted() -> bool:  # the API server's RBAC cache takes the binding a moment later
        out = control_plane.kubectl(
            "auth", "can-i", "get", f"secrets/{verdict_keys.SECRET}", "-n", namespace,
            f"--as={OPERATOR.user}", *(f"--as-group={g}" for g in OPERATOR.groups),
            check=False,
        )  # fmt: skip
        return out.stdout.strip() == "yes"

    wait_for("the operator's verdict-keys Role to take effect", granted, timeout=30)
    return namespace


@pytest.fixture(scope="module")
def ca() -> SoftCA:
    return SoftCA()


@pytest.fixture
def rt(
    operator_clients: kube.Clients, keys_namespace: str, ca: SoftCA, control_plane: ControlPlane
) -> Runtime:
    runtime = Runtime(settings=OperatorSettings(policy_name=POLICY), clients=operator_clients)
    runtime.view.loaded = True
    issuer = verdict_keys.Issuer(namespace=keys_namespace)
    verdict_keys.refresh(
        operator_clients,
        issuer,
        now=dt.datetime.now(dt.UTC),
        leader=True,
        retention=dt.timedelta(seconds=30),
    )
    runtime.verdict_issuer = issuer
    kwargs: dict[str, Any] = {"name": POLICY, "interval": "1s", "valid_for": "30s"}
    # on the server too, as the operator's watch saw it (key release asks the server whether
    # the replica's policy is the latest)
    obj = pool_policy(cast(SwtpmCA, Bundle(ca.bundle_pem())), **kwargs)
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(obj))
    served = kube.get_if_present(operator_clients, SECURITY_POLICIES, POLICY)
    assert served is not None
    runtime.view.policy_version = served["metadata"]["resourceVersion"]
    assert policies.set_policy(runtime, POLICY, policy_trusting(ca.bundle_pem(), **kwargs))
    return runtime


class _Member:
    """A Member on the API server answered by gtvp-agent's code over a SoftTpm."""

    def __init__(self, name: str, tpm: SoftTpm, admin: kube.Clients) -> None:
        self.name, self.tpm = name, tpm
        config = AgentConfig(node=name, tcti="soft", state_dir=Path("/nonexistent"), event_log=None)
        self.agent = Agent(api=admin.custom, config=config, tpm_opener=self._tpm)

    @contextlib.contextmanager
    def _tpm(self) -> Iterator[Tpm]:
        yield cast(Tpm, self.tpm)


@pytest.fixture
def members(
    control_plane: ControlPlane, admin: kube.Clients, ca: SoftCA
) -> Iterator[list[_Member]]:
    made: list[_Member] = []
    try:
        for _ in range(2):
            name = f"tok-{uuid.uuid4().hex[:6]}"
            body = {
                "apiVersion": MEMBERS.api_version,
                "kind": MEMBERS.kind,
                "metadata": {"name": name},
                "spec": {"identity": 3},
            }
            control_plane.kubectl("create", "-f", "-", input_text=json.dumps(body))
            made.append(_Member(name, SoftTpm(ca), admin))
        yield made
    finally:
        for m in made:
            control_plane.kubectl("delete", "member", m.name, "--ignore-not-found", "--wait=false")


def _status(rt: Runtime, name: str) -> dict[str, Any]:
    got = kube.get_if_present(rt.clients, MEMBERS, name)
    assert got is not None
    return cast(dict[str, Any], got.get("status") or {})


def _turn(rt: Runtime, m: _Member) -> None:
    """The agent answers what the Member asks, then the operator judges the Member."""
    m.agent.step()
    got = kube.get_if_present(rt.clients, MEMBERS, m.name)
    assert got is not None
    attestation.observe(rt, got, "MODIFIED")
    asyncio.run(attestation.reconcile(rt, m.name))


def _until(rt: Runtime, m: _Member, reason: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        _turn(rt, m)
        status = _status(rt, m.name)
        if (status.get("trust") or {}).get("reason") == reason:
            return status
        assert time.monotonic() < deadline, status.get("trust")
        time.sleep(0.2)


def _jwks_from_configmap(clients: kube.Clients, namespace: str) -> dict[str, Any]:
    cm = clients.core.read_namespaced_config_map(verdict_keys.CONFIGMAP, namespace)
    return cast(dict[str, Any], json.loads(cm.data[verdict_keys.JWKS_KEY]))


def _verified(token: str, jwks: dict[str, Any]) -> ear.Appraisal:
    claims = ear.verify(token, jwks, audience="gtvp", now=dt.datetime.now(dt.UTC))
    (appraisal,) = ear.appraisals(claims)
    return appraisal


@pytest.mark.timeout(120)
def test_a_trusted_member_gets_an_affirming_token_and_a_tampered_one_a_contraindicated_one(
    rt: Runtime, members: list[_Member], keys_namespace: str
) -> None:
    m = members[0]
    status = _until(rt, m, "QuoteVerified")
    assert status["phase"] == "Trusted"
    jwks = _jwks_from_configmap(rt.clients, keys_namespace)
    a = _verified(status["trust"]["token"], jwks)
    assert (a.member, a.status, a.level) == (m.name, "affirming", status["level"])
    assert a.level == 3
    # issued as this cluster: named by its kube-system namespace's uid
    cluster = rt.clients.core.read_namespace("kube-system").metadata.uid
    assert ear.parse(status["trust"]["token"]).claims["iss"] == f"gtvp.io/cluster/{cluster}"
    assert a.expires == dt.datetime.fromisoformat(
        status["trust"]["expiresAt"].replace("Z", "+00:00")
    )
    # the operator serves the same token to a box on that host
    serve = verdict_keys.documents(rt.verdict_issuer, lambda n: _token_in_view(rt, n))  # type: ignore[arg-type]
    assert serve(f"/ear/members/{m.name}") == (
        200,
        "application/jwt",
        status["trust"]["token"].encode(),
    )
    # a reconcile with nothing new writes nothing: the token adds no write (the next
    # nonce, due every second here, is published by a write of its own: one look first)
    asyncio.run(attestation.reconcile(rt, m.name))
    published = kube.get_if_present(rt.clients, MEMBERS, m.name)
    assert published is not None
    attestation.observe(rt, published, "MODIFIED")
    asyncio.run(attestation.reconcile(rt, m.name))
    got = kube.get_if_present(rt.clients, MEMBERS, m.name)
    assert got is not None
    assert got["metadata"]["resourceVersion"] == published["metadata"]["resourceVersion"]
    assert got["status"]["trust"]["token"] == status["trust"]["token"]
    # tamper: PCR 7 extended; the next quote is refused, and so is the host, in its token
    m.tpm.extend(7, b"an unsigned bootloader")
    status = _until(rt, m, "PcrMismatch")
    assert status["phase"] == "Untrusted"
    token = status["trust"]["token"]
    a = _verified(token, jwks)
    assert (a.status, a.level) == ("contraindicated", 0)
    assert a.vector["executables"] == 96


@pytest.mark.timeout(120)
def test_a_new_generation_that_changes_no_rule_is_named_in_the_next_token(
    rt: Runtime, members: list[_Member], keys_namespace: str, ca: SoftCA
) -> None:
    """An edit that changes nothing the rules say (a comment-like field, a re-apply) makes
    a new generation: members are not judged again for it, but the next token names it as
    the appraisal policy (the policy the verdict was reached under has that generation)."""
    m = members[0]
    first = policy_trusting(ca.bundle_pem(), name=POLICY, interval="1s", valid_for="30s")
    rt.accepted_policies[POLICY] = ("uid", Accepted(4, {}, first))
    policies.set_policy(rt, POLICY, first)  # equal to the fixture's: this object in force
    _until(rt, m, "QuoteVerified")
    jwks = _jwks_from_configmap(rt.clients, keys_namespace)

    def policy_id() -> str:
        token = _status(rt, m.name)["trust"]["token"]
        claims = ear.verify(token, jwks, audience="gtvp", now=dt.datetime.now(dt.UTC))
        (sub,) = claims["submods"].values()
        return str(sub["ear.appraisal-policy-id"])

    assert policy_id().endswith(f"/{POLICY}/generation/4")
    same = policy_trusting(ca.bundle_pem(), name=POLICY, interval="1s", valid_for="30s")
    assert same == first
    assert same is not first
    rt.accepted_policies[POLICY] = ("uid", Accepted(5, {}, same))
    assert not policies.set_policy(rt, POLICY, same)  # nothing to judge again for it
    deadline = time.monotonic() + 20
    while not policy_id().endswith(f"/{POLICY}/generation/5"):
        assert time.monotonic() < deadline, policy_id()
        _turn(rt, m)


def _token_in_view(rt: Runtime, name: str) -> str | None:
    body = rt.view.members.get(name) or {}
    token = ((body.get("status") or {}).get("trust") or {}).get("token")
    return str(token) if token else None


@pytest.mark.timeout(120)
def test_two_members_tokens_prove_both_trusted_offline(
    rt: Runtime,
    members: list[_Member],
    keys_namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tokens = [_until(rt, m, "QuoteVerified")["trust"]["token"] for m in members]
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text(json.dumps(_jwks_from_configmap(rt.clients, keys_namespace)))
    argv = ["token", "verify", *tokens, "--jwks", str(jwks_path), "--min-level", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [m.name for m in members]
    assert all("affirming, level 3" in line for line in out)
    # one more level than they hold: refused
    assert cli.main([*argv[:-1], "4"]) == 1
    # PyJWT, with the JWK from the ConfigMap, agrees (any JWT library can check them)
    jwt = pytest.importorskip("jwt")
    (entry,) = json.loads(jwks_path.read_text())["keys"]
    for token in tokens:
        claims = jwt.decode(token, jwt.PyJWK(entry).key, algorithms=["ES256"], audience="gtvp")
        assert next(iter(claims["submods"].values()))["ear.status"] == "affirming"


def test_two_operators_starting_at_once_create_the_keys_once(
    control_plane: ControlPlane, keys_namespace: str
) -> None:
    clients = [kube.make_clients(str(control_plane.kubeconfig_for(OPERATOR))) for _ in range(2)]
    issuers = [verdict_keys.Issuer(namespace=keys_namespace) for _ in clients]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def start(i: int) -> None:
        barrier.wait()
        try:
            verdict_keys.refresh(
                clients[i],
                issuers[i],
                now=dt.datetime.now(dt.UTC),
                leader=False,
                retention=dt.timedelta(seconds=30),
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    kids = {issuer.signing_key.kid for issuer in issuers if issuer.signing_key}
    assert len(kids) == 1  # both sign with the same key
    secret = clients[0].core.read_namespaced_secret(verdict_keys.SECRET, keys_namespace)
    stored = verdict_keys.load(base64.b64decode(secret.data[verdict_keys.SECRET_KEY]).decode())
    assert [k.kid for k in stored] == list(kids)
    assert [k["kid"] for k in _jwks_from_configmap(clients[0], keys_namespace)["keys"]] == list(
        kids
    )


def _loaded_issuer(
    clients: kube.Clients, namespace: str, now: dt.datetime, retention: dt.timedelta
) -> verdict_keys.Issuer:
    """A replica's signer with the keys of `namespace` loaded (made when there are none)."""
    issuer = verdict_keys.Issuer(namespace=namespace)
    verdict_keys.refresh(clients, issuer, now=now, leader=True, retention=retention)
    return issuer


def test_rotation_signs_with_the_new_key_and_keeps_the_old_one_published(
    control_plane: ControlPlane, operator_clients: kube.Clients, keys_namespace: str
) -> None:
    now, retention = dt.datetime.now(dt.UTC), dt.timedelta(seconds=30)
    issuer = _loaded_issuer(operator_clients, keys_namespace, now, retention)
    old = issuer.signing_key
    assert old is not None
    # `gtvp token rotate-key` as an administrator
    kubeconfig = str(control_plane.kubeconfig_for(ADMIN))
    argv = ["token", "rotate-key", "--kubeconfig", kubeconfig, "--namespace", keys_namespace]
    assert cli.main(argv) == 0
    verdict_keys.refresh(operator_clients, issuer, now=now, leader=True, retention=retention)
    assert issuer.signing_key is not None
    assert issuer.signing_key.kid != old.kid
    published = [k["kid"] for k in _jwks_from_configmap(operator_clients, keys_namespace)["keys"]]
    assert published == [old.kid, issuer.signing_key.kid]
    # once every token the old key signed has expired, the leader removes it
    later = now + retention + verdict_keys.REFRESH + dt.timedelta(seconds=1)
    verdict_keys.refresh(operator_clients, issuer, now=later, leader=True, retention=retention)
    published = [k["kid"] for k in _jwks_from_configmap(operator_clients, keys_namespace)["keys"]]
    assert published == [issuer.signing_key.kid]
    secret = operator_clients.core.read_namespaced_secret(verdict_keys.SECRET, keys_namespace)
    stored = verdict_keys.load(base64.b64decode(secret.data[verdict_keys.SECRET_KEY]).decode())
    assert [k.kid for k in stored] == published


def test_the_operator_may_not_read_other_secrets(
    operator_clients: kube.Clients, keys_namespace: str, admin: kube.Clients
) -> None:
    """The chart's Role names its Secret: any other Secret in the namespace stays closed."""
    body = {"metadata": {"name": "someone-elses"}, "stringData": {"password": "x"}}
    admin.core.create_namespaced_secret(keys_namespace, body)
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        operator_clients.core.read_namespaced_secret("someone-elses", keys_namespace)
    assert refused.value.status == 403


def test_a_stolen_key_is_withdrawn_at_once_with_revoke_previous(
    control_plane: ControlPlane, operator_clients: kube.Clients, keys_namespace: str
) -> None:
    """A signing key may be stolen (the operator's account can read it): `rotate-key
    --revoke-previous` publishes the new key alone, so a token the old key signs (a forged
    one, or one issued before) verifies no more, while the new key's do."""
    now, retention = dt.datetime.now(dt.UTC), dt.timedelta(hours=72)
    issuer = _loaded_issuer(operator_clients, keys_namespace, now, retention)
    # an operator run with --token-issuer: its JWKS names that issuer
    issuer.name = "gtvp.io/cluster/as-configured"
    verdict_keys.refresh(operator_clients, issuer, now=now, leader=True, retention=retention)
    stolen = issuer.signing_key
    assert stolen is not None
    claims = {
        "eat_profile": ear.EAR_PROFILE,
        "submods": {"node-9": {"ear.status": "affirming"}},
        "aud": "gtvp",
        "iat": int(now.timestamp()),
        "exp": int(now.timestamp()) + 3600,
    }
    forged = ear.sign(claims, stolen.private)
    kubeconfig = str(control_plane.kubeconfig_for(ADMIN))
    argv = ["token", "rotate-key", "--kubeconfig", kubeconfig, "--namespace", keys_namespace,
            "--revoke-previous"]  # fmt: skip
    assert cli.main(argv) == 0
    # the rotation keeps the issuer the JWKS names (not the one it would derive)
    assert _jwks_from_configmap(operator_clients, keys_namespace)["issuer"] == issuer.name
    verdict_keys.refresh(operator_clients, issuer, now=now, leader=True, retention=retention)
    assert issuer.signing_key is not None
    assert issuer.signing_key.kid != stolen.kid
    jwks = _jwks_from_configmap(operator_clients, keys_namespace)
    assert [k["kid"] for k in jwks["keys"]] == [issuer.signing_key.kid]
    with pytest.raises(ear.TokenRefused) as refused:
        ear.verify(forged, jwks, audience="gtvp", now=now)
    assert refused.value.reason == "unknown-key"
    fresh = ear.sign(claims, issuer.signing_key.private)
    assert ear.verify(fresh, jwks, audience="gtvp", now=now)["aud"] == "gtvp"


def test_a_members_token_signed_by_a_withdrawn_key_is_signed_anew(
    control_plane: ControlPlane, rt: Runtime, members: list[_Member], keys_namespace: str
) -> None:
    """After `rotate-key --revoke-previous` a member's standing token no longer verifies:
    the operator's next look at it signs it anew with the new key, its verdict unchanged."""
    m = members[0]
    _until(rt, m, "QuoteVerified")
    before = _status(rt, m.name)["trust"]
    kubeconfig = str(control_plane.kubeconfig_for(ADMIN))
    argv = ["token", "rotate-key", "--kubeconfig", kubeconfig, "--namespace", keys_namespace,
            "--revoke-previous"]  # fmt: skip
    assert cli.main(argv) == 0
    issuer = rt.verdict_issuer
    assert issuer is not None
    now = dt.datetime.now(dt.UTC)
    verdict_keys.refresh(rt.clients, issuer, now=now, leader=True, retention=dt.timedelta(hours=1))
    got = kube.get_if_present(rt.clients, MEMBERS, m.name)
    assert got is not None
    attestation.observe(rt, got, "MODIFIED")
    asyncio.run(attestation.reconcile(rt, m.name))  # no new evidence: the same verdict
    after = _status(rt, m.name)["trust"]
    assert after["verifiedAt"] == before["verifiedAt"]
    jwks = _jwks_from_configmap(rt.clients, keys_namespace)
    assert _verified(after["token"], jwks).status == ear.AFFIRMING


def test_keys_load_and_publish_even_where_the_cluster_cannot_be_named(
    control_plane: ControlPlane, keys_namespace: str
) -> None:
    """An operator that may not read the kube-system namespace (a narrowed ClusterRole)
    cannot name its tokens' issuer: it issues none and says why, but its keys still load and
    the JWKS is still served (tokens it issued before still verify)."""
    user = Identity("gtvp-test-keys-only", (), "keys-only")
    rbac = "rbac.authorization.k8s.io"
    binding = {
        "apiVersion": f"{rbac}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "gtvp-test-keys-only", "namespace": keys_namespace},
        "subjects": [{"apiGroup": rbac, "kind": "User", "name": user.user}],
        "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "gtvp-operator-verdict-keys"},
    }
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(binding))
    clients = kube.make_clients(str(control_plane.kubeconfig_for(user)))
    issuer = verdict_keys.Issuer(namespace=keys_namespace)
    now = dt.datetime.now(dt.UTC)
    deadline = time.monotonic() + 15  # the API server's RBAC cache takes the binding later
    while not issuer.keys and time.monotonic() < deadline:
        try:
            verdict_keys.refresh(clients, issuer, now=now, leader=True, retention=dt.timedelta(1))
        except Exception:  # noqa: BLE001 - not bound yet
            time.sleep(0.3)
    assert issuer.keys
    assert issuer.name is None
    assert issuer.token("m", {"phase": "Trusted"}, None, now, dt.timedelta(minutes=1)) is None
    assert issuer.jwks()["keys"]

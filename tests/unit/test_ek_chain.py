"""The EK certificate path (`enrolment.check_ek_certificate`): RFC 5280 path validation by
`cryptography.x509.verification` with gtvp's EK checks on top.

Certificates are built here with `cryptography`, shaped like swtpm's (`tests/softtpm.py`):
an EK certificate with no subject, the TPM in a critical directoryName subjectAltName,
EKU tcg-kp-EKCertificate. Real swtpm certificates are covered by `tests/tpm/test_tamper.py`.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from gtvp.core import errors
from gtvp.core.enrolment import check_ek_certificate, spki_der
from tests.softtpm import TCG_EK_CERTIFICATE

NOW = dt.datetime.now(dt.UTC)
TPM = x509.Name(
    [
        x509.NameAttribute(ObjectIdentifier("2.23.133.2.1"), "id:47545650"),
        x509.NameAttribute(ObjectIdentifier("2.23.133.2.2"), "soft"),
        x509.NameAttribute(ObjectIdentifier("2.23.133.2.3"), "id:20191023"),
    ]
)


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


class _CA:
    """A CA certificate and its key; `issue` signs CAs and EK certificates below it."""

    def __init__(
        self,
        name: str,
        issuer: _CA | None = None,
        *,
        ca: bool = True,
        path_length: int | None = None,
        name_constraints: x509.NameConstraints | None = None,
        days: tuple[int, int] = (-1, 365),
        signer: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _cn(name)
        builder = (
            _base(self.name, self.key.public_key(), issuer.name if issuer else self.name, days)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
        )
        if name_constraints is not None:
            builder = builder.add_extension(name_constraints, critical=True)
        self.cert = builder.sign(signer or (issuer.key if issuer else self.key), hashes.SHA256())

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def certify_ek(self, ek: ec.EllipticCurvePublicKey, *, san: x509.Name = TPM) -> bytes:
        cert = (
            _base(x509.Name([]), ek, self.name, (-1, 365))
            .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(san)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([TCG_EK_CERTIFICATE]), critical=False)
            .add_extension(
                x509.KeyUsage(False, False, False, False, True, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)


def _base(
    subject: x509.Name, key: ec.EllipticCurvePublicKey, issuer: x509.Name, days: tuple[int, int]
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + dt.timedelta(days=days[0]))
        .not_valid_after(NOW + dt.timedelta(days=days[1]))
    )


def _check(issuer: _CA, chain: list[_CA], root: _CA, *, san: x509.Name = TPM) -> x509.Certificate:
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    return check_ek_certificate(
        ek_spki=spki_der(ek),
        certificate=issuer.certify_ek(ek, san=san),
        presented_chain=[c.der for c in chain],
        ca_bundle_pem=root.pem(),
        now=NOW,
    )


def test_a_path_through_presented_intermediates_verifies_to_the_bundle() -> None:
    root = _CA("TPM vendor root", path_length=1)
    inter = _CA("TPM vendor EK CA", root, path_length=0)
    assert _check(inter, [inter], root).subject == root.name


def test_an_exceeded_path_length_constraint_is_refused() -> None:
    root = _CA("TPM vendor root")
    upper = _CA("TPM vendor CA 1", root, path_length=0)
    lower = _CA("TPM vendor CA 2", upper)
    with pytest.raises(
        errors.EkCertificateUntrusted,
        match=r"intermediate CA \(CN=TPM vendor CA 1\) allows 0 intermediate CA\(s\) below it "
        r"\(pathLenConstraint\), the EK certificate's path has 1",
    ):
        _check(lower, [lower, upper], root)


def test_a_path_length_constraint_on_the_root_counts_too() -> None:
    root = _CA("TPM vendor root", path_length=0)
    inter = _CA("TPM vendor EK CA", root)
    with pytest.raises(errors.EkCertificateUntrusted, match=r"trusted CA \(CN=TPM vendor root\)"):
        _check(inter, [inter], root)


def test_name_constraints_of_a_ca_are_enforced() -> None:
    """`cryptography` matches dNSName, iPAddress and rfc822Name constraints against the
    subjectAltNames below; a critical constraint it cannot match (directoryName, URI) refuses
    the path rather than being ignored. An EK certificate carries a directoryName."""
    root = _CA("TPM vendor root")
    other_tpm = x509.Name([x509.NameAttribute(ObjectIdentifier("2.23.133.2.1"), "id:00000000")])
    inter = _CA(
        "TPM vendor EK CA",
        root,
        name_constraints=x509.NameConstraints([x509.DirectoryName(other_tpm)], None),
    )
    with pytest.raises(
        errors.EkCertificateUntrusted,
        match=r"violates the name constraints of an intermediate CA \(CN=TPM vendor EK CA\): "
        ".*directoryName",
    ):
        _check(inter, [inter], root)


def test_a_dns_name_constraint_the_ek_certificate_violates_is_refused() -> None:
    root = _CA("TPM vendor root")
    inter = _CA(
        "TPM vendor EK CA",
        root,
        name_constraints=x509.NameConstraints(None, [x509.DNSName("tpm.example")]),
    )
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    leaf = (
        _base(x509.Name([]), ek, inter.name, (-1, 365))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("node1.tpm.example")]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([TCG_EK_CERTIFICATE]), critical=False)
        .sign(inter.key, hashes.SHA256())
    )
    with pytest.raises(
        errors.EkCertificateUntrusted,
        match=r"name constraints of an intermediate CA \(CN=TPM vendor EK CA\): "
        "excluded name constraint matched SAN",
    ):
        check_ek_certificate(
            ek_spki=spki_der(ek),
            certificate=leaf.public_bytes(serialization.Encoding.DER),
            presented_chain=[inter.der],
            ca_bundle_pem=root.pem(),
            now=NOW,
        )


def test_a_certificate_of_the_ca_that_is_no_ek_certificate_does_not_enrol() -> None:
    """The certificate is the only proof that a key lives in a TPM: a CA in the bundle that
    also issues other certificates (a device's, a server's) must not let root enrol a key
    held in software. Without the EK extended key usage nor a TPM manufacturer in its
    subjectAltName, or with a keyUsage for another purpose, it is refused. Found by a
    review."""
    root = _CA("TPM vendor root")
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()

    def check(*extensions: tuple[x509.ExtensionType, bool]) -> x509.Certificate:
        builder = _base(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]), ek,
                        root.name, (-1, 365))  # fmt: skip
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return check_ek_certificate(
            ek_spki=spki_der(ek),
            certificate=builder.sign(root.key, hashes.SHA256()).public_bytes(
                serialization.Encoding.DER
            ),
            presented_chain=[],
            ca_bundle_pem=root.pem(),
            now=NOW,
        )

    with pytest.raises(errors.EkCertificateInvalid, match="no TCG EK certificate"):
        check()
    signing = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    with pytest.raises(errors.EkCertificateInvalid, match="lacks keyAgreement"):
        check((x509.ExtendedKeyUsage([TCG_EK_CERTIFICATE]), False), (signing, True))
    # a TPM manufacturer in its subjectAltName marks an EK certificate without an EKU
    assert check((x509.SubjectAlternativeName([x509.DirectoryName(TPM)]), True))


def test_an_expired_intermediate_is_refused() -> None:
    root = _CA("TPM vendor root")
    inter = _CA("TPM vendor EK CA", root, days=(-30, -1))
    with pytest.raises(
        errors.EkCertificateInvalid,
        match=r"an intermediate CA \(CN=TPM vendor EK CA\) expired on",
    ):
        _check(inter, [inter], root)


def test_an_intermediate_not_yet_valid_is_refused_beyond_the_clock_skew() -> None:
    root = _CA("TPM vendor root")
    inter = _CA("TPM vendor EK CA", root, days=(1, 30))
    with pytest.raises(errors.EkCertificateInvalid, match=r"\(CN=TPM vendor EK CA\) is not valid"):
        _check(inter, [inter], root)


def test_a_wrong_signature_on_an_intermediate_is_refused() -> None:
    root = _CA("TPM vendor root")
    forger = ec.generate_private_key(ec.SECP256R1())
    inter = _CA("TPM vendor EK CA", root, signer=forger)
    with pytest.raises(
        errors.EkCertificateUntrusted,
        match="the signature on intermediate CN=TPM vendor EK CA does not verify with the key "
        "of its issuer CN=TPM vendor root",
    ):
        _check(inter, [inter], root)


def test_a_non_ca_intermediate_is_refused() -> None:
    root = _CA("TPM vendor root")
    inter = _CA("TPM vendor EK CA", root, ca=False)
    with pytest.raises(
        errors.EkCertificateUntrusted,
        match=r"an intermediate CA \(CN=TPM vendor EK CA\) signs the chain but is not a CA",
    ):
        _check(inter, [inter], root)


def test_a_validated_path_is_reused_only_while_every_ca_on_it_is_valid() -> None:
    root = _CA("TPM vendor root")
    inter = _CA("TPM vendor EK CA", root, days=(-1, 10))
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = inter.certify_ek(ek)

    def check(at: dt.datetime) -> x509.Certificate:
        return check_ek_certificate(
            ek_spki=spki_der(ek),
            certificate=cert,
            presented_chain=[inter.der],
            ca_bundle_pem=root.pem(),
            now=at,
        )

    assert check(NOW).subject == root.name
    assert check(NOW).subject == root.name  # the path validated before
    with pytest.raises(errors.EkCertificateInvalid, match=r"TPM vendor EK CA\) expired on"):
        check(NOW + dt.timedelta(days=11))
    assert check(NOW + dt.timedelta(days=1)).subject == root.name


def test_an_ek_certificate_in_the_bundle_is_not_its_own_anchor() -> None:
    root = _CA("TPM vendor root")
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = root.certify_ek(ek)
    pem = x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.PEM).decode()

    def check(bundle: str) -> x509.Certificate:
        return check_ek_certificate(
            ek_spki=spki_der(ek),
            certificate=cert,
            presented_chain=[],
            ca_bundle_pem=bundle,
            now=NOW,
        )

    assert check(pem + root.pem()).subject == root.name  # its CA is the anchor
    with pytest.raises(errors.EkCertificateUntrusted, match="holds no CA"):
        check(pem)


def test_a_ca_without_key_cert_sign_is_refused() -> None:
    root = _CA("TPM vendor root")
    key = ec.generate_private_key(ec.SECP256R1())
    inter = _CA("TPM vendor EK CA", root)
    inter.key = key
    inter.cert = (
        _base(inter.name, key.public_key(), root.name, (-1, 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .sign(root.key, hashes.SHA256())
    )
    with pytest.raises(
        errors.EkCertificateUntrusted,
        match=r"an intermediate CA \(CN=TPM vendor EK CA\) signs the chain but is not a CA",
    ):
        _check(inter, [inter], root)


def test_a_renewed_intermediate_presented_beside_an_expired_one_still_verifies() -> None:
    """The path kept for an EK certificate ran through an intermediate that has expired
    since; the agent now presents the renewed one (same name and key) as well: judged
    afresh with everything presented, it verifies, as an uncached check would."""
    root = _CA("TPM vendor root")
    inter = _CA("TPM vendor EK CA", root, days=(-1, 10))
    renewed = (
        _base(inter.name, inter.key.public_key(), root.name, (-1, 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(inter.key.public_key()), critical=False
        )
        .sign(root.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = inter.certify_ek(ek)

    def check(at: dt.datetime, chain: list[bytes]) -> x509.Certificate:
        return check_ek_certificate(
            ek_spki=spki_der(ek),
            certificate=cert,
            presented_chain=chain,
            ca_bundle_pem=root.pem(),
            now=at,
        )

    assert check(NOW, [inter.der]).subject == root.name  # kept, through `inter`
    later = NOW + dt.timedelta(days=11)
    assert check(later, [inter.der, renewed]).subject == root.name
    assert check(later, [renewed, inter.der]).subject == root.name


def test_extra_certificates_presented_beside_an_ek_certificate_keep_one_entry() -> None:
    """An agent varying what it presents beside its genuine EK certificate (each a new
    junk certificate) gets each judged, but keeps one cached path, not one per variant."""
    from gtvp.core import enrolment

    root = _CA("TPM vendor root")
    inter = _CA("TPM vendor EK CA", root)
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = inter.certify_ek(ek)
    before = len(enrolment._EK_PATHS)
    for i in range(20):
        junk = _CA(f"junk {i}")
        got = check_ek_certificate(
            ek_spki=spki_der(ek),
            certificate=cert,
            presented_chain=[inter.der, junk.der],
            ca_bundle_pem=root.pem(),
            now=NOW,
        )
        assert got.subject == root.name
    assert len(enrolment._EK_PATHS) <= before + 1


def test_a_presented_certificate_whose_names_cannot_be_read_is_an_untrusted_chain() -> None:
    """`cryptography` reads a certificate's names only when asked: an agent presenting one
    with a subject that is not UTF-8 beside a leaf that fails must get the chain refused
    (a tampering sign, readmission applies), not an exception gtvp takes for its own fault."""
    root = _CA("TPM vendor root")
    stranger = _CA("TPM vendor EK CA")  # self-signed: no path to the bundle
    garbled = _CA("XXXXXXXXXXXX", root)
    der = garbled.der.replace(b"XXXXXXXXXXXX", b"\xff\xfe" * 6)
    with pytest.raises(ValueError, match="subject"):  # as the agent presents it
        _ = x509.load_der_x509_certificate(der).subject
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(errors.EkCertificateUntrusted, match="cannot be read"):
        check_ek_certificate(
            ek_spki=spki_der(ek),
            certificate=stranger.certify_ek(ek),
            presented_chain=[der],
            ca_bundle_pem=root.pem(),
            now=NOW,
        )

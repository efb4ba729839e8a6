// Command gtvp-box-attest is a Lazy Box's attestation client (box attestation protocol v1,
// docs/boxattest.md): it runs inside the box VM, on the box's vTPM.
//
//	gtvp-box-attest extend <pcr> <sha256 hex>   extend a sha256 PCR (the init, per component disk)
//	gtvp-box-attest pcr <pcr>                   print "GTVP-PCR<n> <hex>" (the sha256 bank)
//	gtvp-box-attest run [-measurements FILE] [-serial cloudinit]
//	    read the "#gtvp-attest <base64 JSON>" line of the cloud-init disk (virtio serial
//	    "cloudinit") and loop: challenge; enrol and activate when told; quote PCR 13 with
//	    the nonce as qualifying data. One console line per event ("GTVP-ATTEST ...").
//	    Without the line it says so and exits 0; an unreachable server never stops it.
//
// The TPM is /dev/tpmrm0 (else /dev/tpm0); GTVP_TPM=unix:<path> talks to an swtpm socket
// (tests on the host).
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

const (
	marker    = "GTVP-ATTEST"
	ekCertRSA = tpm2.TPMHandle(0x01c00002) // TCG: the RSA 2048 EK certificate's NV index
	attestTag = "#gtvp-attest "
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "extend":
		err = cmdExtend(os.Args[2:])
	case "pcr":
		err = cmdPCR(os.Args[2:])
	case "run":
		err = cmdRun(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "gtvp-box-attest %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: gtvp-box-attest extend <pcr> <sha256 hex> | pcr <pcr> | run [-measurements FILE] [-serial SERIAL]")
	os.Exit(2)
}

func openTPM() (transport.TPMCloser, error) {
	if p, ok := strings.CutPrefix(os.Getenv("GTVP_TPM"), "unix:"); ok {
		return linuxudstpm.Open(p)
	}
	for _, dev := range []string{"/dev/tpmrm0", "/dev/tpm0"} {
		if _, err := os.Stat(dev); err == nil {
			return linuxtpm.Open(dev)
		}
	}
	return nil, errors.New("no TPM: neither /dev/tpmrm0 nor /dev/tpm0 exists")
}

func parsePCR(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 23 {
		return 0, fmt.Errorf("PCR %q: a number from 0 to 23", s)
	}
	return n, nil
}

func cmdExtend(args []string) error {
	if len(args) != 2 {
		usage()
	}
	pcr, err := parsePCR(args[0])
	if err != nil {
		return err
	}
	digest, err := hex.DecodeString(strings.TrimPrefix(args[1], "sha256:"))
	if err != nil || len(digest) != sha256.Size {
		return fmt.Errorf("digest %q: 64 hex digits", args[1])
	}
	tpm, err := openTPM()
	if err != nil {
		return err
	}
	defer tpm.Close()
	return extend(tpm, pcr, digest)
}

func extend(tpm transport.TPM, pcr int, digest []byte) error {
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{
			Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: digest}},
		},
	}.Execute(tpm)
	return err
}

func selection(pcr int) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash:      tpm2.TPMAlgSHA256,
		PCRSelect: tpm2.PCClientCompatible.PCRs(uint(pcr)),
	}}}
}

func readPCR(tpm transport.TPM, pcr int) ([]byte, error) {
	rsp, err := tpm2.PCRRead{PCRSelectionIn: selection(pcr)}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	if len(rsp.PCRValues.Digests) != 1 {
		return nil, fmt.Errorf("PCR %d: the TPM has no sha256 bank", pcr)
	}
	return rsp.PCRValues.Digests[0].Buffer, nil
}

func cmdPCR(args []string) error {
	if len(args) != 1 {
		usage()
	}
	pcr, err := parsePCR(args[0])
	if err != nil {
		return err
	}
	tpm, err := openTPM()
	if err != nil {
		return err
	}
	defer tpm.Close()
	v, err := readPCR(tpm, pcr)
	if err != nil {
		return err
	}
	fmt.Printf("GTVP-PCR%d %x\n", pcr, v)
	return nil
}

// --- the client -------------------------------------------------------------------------

type config struct {
	V          int    `json:"v"`
	URL        string `json:"url"`
	Box        string `json:"box"`
	Credential string `json:"credential"`
	CAPem      string `json:"caPem"`
	PCR        int    `json:"pcr"`
}

// findSerial: the block device whose virtio serial is `serial`.
func findSerial(serial string) (string, error) {
	paths, _ := filepath.Glob("/sys/block/*/serial")
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err == nil && strings.TrimSpace(string(b)) == serial {
			return "/dev/" + filepath.Base(filepath.Dir(p)), nil
		}
	}
	return "", fmt.Errorf("no disk with serial %q", serial)
}

// parseConfig: the "#gtvp-attest <base64 JSON>" line of the user data (nil without one).
func parseConfig(userData []byte) (*config, error) {
	sc := bufio.NewScanner(bytes.NewReader(userData))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r\x00 ")
		rest, ok := strings.CutPrefix(line, attestTag)
		if !ok {
			continue
		}
		raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(rest))
		if err != nil {
			return nil, fmt.Errorf("the #gtvp-attest line is not base64: %v", err)
		}
		var c config
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("the #gtvp-attest line is not JSON: %v", err)
		}
		if c.V != 1 || c.URL == "" || c.Box == "" || c.Credential == "" {
			return nil, fmt.Errorf("the #gtvp-attest line lacks v=1, url, box or credential")
		}
		if c.PCR == 0 {
			c.PCR = 13
		}
		return &c, nil
	}
	return nil, nil
}

func say(format string, a ...any) {
	fmt.Printf(marker+" "+format+"\n", a...)
}

func cmdRun(args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	measurements := fs.String("measurements", "/run/gtvp/measurements", "the digests the init extended, one sha256:<hex> a line")
	serial := fs.String("serial", "cloudinit", "the cloud-init disk's virtio serial")
	userData := fs.String("userdata", "", "read the user data from this file instead")
	_ = fs.Parse(args)
	path := *userData
	if path == "" {
		dev, err := findSerial(*serial)
		if err != nil {
			say("off: %v (no cloud-init disk)", err)
			return nil
		}
		path = dev
	}
	data, err := readHead(path, 1<<20)
	if err != nil {
		say("off: cannot read the user data: %v", err)
		return nil
	}
	cfg, err := parseConfig(data)
	if err != nil {
		say("off: %v", err)
		return nil
	}
	if cfg == nil {
		say("off: no #gtvp-attest line in the user data")
		return nil
	}
	c, err := newClient(cfg, *measurements)
	if err != nil {
		say("off: %v", err)
		return nil
	}
	say("client for %s at %s", cfg.Box, cfg.URL)
	c.loop()
	return nil
}

func readHead(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, max))
}

type client struct {
	cfg          *config
	http         *http.Client
	measurements string
	last         string // the last state said on the console (say each change once)
}

func newClient(cfg *config, measurements string) (*client, error) {
	// caPem pins the endpoint's CA; without one (gtvp-operator run without
	// --key-release-ca) the guest's own trust store is used: an empty pool would trust
	// nothing, and no box could ever attest
	var pool *x509.CertPool
	if cfg.CAPem != "" {
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(cfg.CAPem)) {
			return nil, errors.New("caPem holds no certificate")
		}
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	return &client{cfg: cfg, http: &http.Client{Transport: tr, Timeout: 20 * time.Second}, measurements: measurements}, nil
}

// apiError: the server's 4xx/5xx answer.
type apiError struct {
	Status  int
	Code    string `json:"error"`
	Message string `json:"message"`
}

func (e *apiError) Error() string {
	return fmt.Sprintf("HTTP %d %s: %s", e.Status, e.Code, e.Message)
}

func (c *client) post(path string, body map[string]any, out any) error {
	body["box"] = c.cfg.Box
	raw, _ := json.Marshal(body)
	req, err := http.NewRequest("POST", strings.TrimRight(c.cfg.URL, "/")+path, bytes.NewReader(raw))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+c.cfg.Credential)
	rsp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer rsp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(rsp.Body, 1<<20))
	if err != nil {
		return err
	}
	if rsp.StatusCode != 200 {
		e := &apiError{Status: rsp.StatusCode}
		_ = json.Unmarshal(data, e)
		return e
	}
	return json.Unmarshal(data, out)
}

// state: say a state on the console when it differs from the last one said.
func (c *client) state(s string) {
	if s != c.last {
		say("%s", s)
		c.last = s
	}
}

type challengeRsp struct {
	Nonce      *string  `json:"nonce"`
	Enrol      bool     `json:"enrol"`
	RetryAfter *float64 `json:"retryAfter"`
}

func (c *client) loop() {
	justEnrolled := false
	for {
		wait := 5 * time.Second
		var ch challengeRsp
		if err := c.post("/boxattest/v1/challenge", map[string]any{}, &ch); err != nil {
			var refused *apiError
			if errors.As(err, &refused) {
				c.state(fmt.Sprintf("refused by %s: %v (retrying)", c.cfg.URL, err))
			} else {
				c.state(fmt.Sprintf("unreachable %s: %v (retrying; the box keeps running)", c.cfg.URL, err))
			}
			time.Sleep(wait)
			continue
		}
		if ch.RetryAfter != nil && *ch.RetryAfter >= 1 && *ch.RetryAfter <= 300 {
			wait = time.Duration(*ch.RetryAfter * float64(time.Second))
		}
		again := justEnrolled
		justEnrolled = false
		switch {
		case ch.Enrol && again:
			// asked to enrol again straight after an enrolment (a replica that has not
			// seen it yet): wait before enrolling, so that this never becomes a loop
			c.state("asked to enrol again at once; waiting before the next enrolment")
		case ch.Enrol:
			if err := c.enrol(); err != nil {
				c.state(fmt.Sprintf("enrol failed: %v", err))
			} else {
				c.last = ""
				say("enrolled")
				justEnrolled = true
				continue // ask again at once: the server wants a quote now
			}
		case ch.Nonce != nil:
			if err := c.quote(*ch.Nonce); err != nil {
				c.state(fmt.Sprintf("quote failed: %v", err))
			} else {
				c.last = ""
			}
		default:
			c.state("idle")
		}
		time.Sleep(wait)
	}
}

// --- TPM work: EK, AK, credential activation, quote ---------------------------------------

// akTemplate: an ECC P-256 restricted signing key (ECDSA-SHA256), a primary in the
// endorsement hierarchy: the same key each time it is created on this TPM.
var akTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		NoDA:                true,
		Restricted:          true,
		SignEncrypt:         true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme: tpm2.TPMTECCScheme{
			Scheme: tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
				&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
		},
		CurveID: tpm2.TPMECCNistP256,
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
}

type key struct {
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
	public tpm2.TPM2BPublic
}

func primary(tpm transport.TPM, tmpl tpm2.TPMTPublic) (*key, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	return &key{rsp.ObjectHandle, rsp.Name, rsp.OutPublic}, nil
}

func flush(tpm transport.TPM, k *key) {
	if k != nil {
		_, _ = tpm2.FlushContext{FlushHandle: k.handle}.Execute(tpm)
	}
}

func readNV(tpm transport.TPM, index tpm2.TPMHandle) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: index}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("no EK certificate at NV %#x: %w", uint32(index), err)
	}
	area, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	var out []byte
	for off := 0; off < int(area.DataSize); {
		n := int(area.DataSize) - off
		if n > 768 {
			n = 768
		}
		rsp, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: index, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: pub.NVName},
			Size:       uint16(n),
			Offset:     uint16(off),
		}.Execute(tpm)
		if err != nil {
			return nil, fmt.Errorf("reading NV %#x: %w", uint32(index), err)
		}
		out = append(out, rsp.Data.Buffer...)
		off += n
	}
	return out, nil
}

// certDER: the NV index may hold padding after the DER certificate.
func certDER(nv []byte) []byte {
	if len(nv) > 4 && nv[0] == 0x30 && nv[1] == 0x82 {
		n := 4 + int(nv[2])<<8 + int(nv[3])
		if n <= len(nv) {
			return nv[:n]
		}
	}
	return nv
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func (c *client) enrol() error {
	tpm, err := openTPM()
	if err != nil {
		return err
	}
	defer tpm.Close()
	cert, err := readNV(tpm, ekCertRSA)
	if err != nil {
		return err
	}
	ek, err := primary(tpm, tpm2.RSAEKTemplate)
	if err != nil {
		return fmt.Errorf("creating the EK: %w", err)
	}
	defer flush(tpm, ek)
	ak, err := primary(tpm, akTemplate)
	if err != nil {
		return fmt.Errorf("creating the AK: %w", err)
	}
	defer flush(tpm, ak)
	var en struct {
		Enrolment      string `json:"enrolment"`
		CredentialBlob string `json:"credentialBlob"`
		Secret         string `json:"secret"`
	}
	err = c.post("/boxattest/v1/enrol", map[string]any{
		"ekCertificate": b64(certDER(cert)),
		"ekPublic":      b64(tpm2.Marshal(ek.public)),
		"akPublic":      b64(tpm2.Marshal(ak.public)),
	}, &en)
	if err != nil {
		return fmt.Errorf("enrol: %w", err)
	}
	blobRaw, err1 := base64.StdEncoding.DecodeString(en.CredentialBlob)
	secRaw, err2 := base64.StdEncoding.DecodeString(en.Secret)
	if err1 != nil || err2 != nil {
		return errors.New("enrol: the answer's credentialBlob or secret is not base64")
	}
	blob, err := tpm2.Unmarshal[tpm2.TPM2BIDObject](blobRaw)
	if err != nil {
		return fmt.Errorf("enrol: credentialBlob: %w", err)
	}
	sec, err := tpm2.Unmarshal[tpm2.TPM2BEncryptedSecret](secRaw)
	if err != nil {
		return fmt.Errorf("enrol: secret: %w", err)
	}
	endorsement := tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, h tpm2.TPMISHPolicy, nonce tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicySecret{
			AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			PolicySession: h,
			NonceTPM:      nonce,
		}.Execute(t)
		return err
	})
	act, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: ek.handle, Name: ek.name, Auth: endorsement},
		CredentialBlob: *blob,
		Secret:         *sec,
	}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("ActivateCredential: %w", err)
	}
	var bound struct {
		Bound bool `json:"bound"`
	}
	err = c.post("/boxattest/v1/activate", map[string]any{
		"enrolment": en.Enrolment,
		"secret":    b64(act.CertInfo.Buffer),
	}, &bound)
	if err != nil {
		return fmt.Errorf("activate: %w", err)
	}
	if !bound.Bound {
		return errors.New("activate: the server did not bind the AK")
	}
	return nil
}

func (c *client) readMeasurements() []string {
	out := []string{}
	data, err := os.ReadFile(c.measurements)
	if err != nil {
		return out
	}
	for _, line := range strings.Fields(string(data)) {
		out = append(out, line)
	}
	return out
}

func (c *client) quote(nonceHex string) error {
	nonce, err := hex.DecodeString(nonceHex)
	if err != nil || len(nonce) == 0 || len(nonce) > 64 {
		return fmt.Errorf("the nonce %q is not hex", nonceHex)
	}
	tpm, err := openTPM()
	if err != nil {
		return err
	}
	defer tpm.Close()
	ak, err := primary(tpm, akTemplate)
	if err != nil {
		return fmt.Errorf("creating the AK: %w", err)
	}
	defer flush(tpm, ak)
	q, err := tpm2.Quote{
		SignHandle:     tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect:      selection(c.cfg.PCR),
	}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("Quote: %w", err)
	}
	pcr, err := readPCR(tpm, c.cfg.PCR)
	if err != nil {
		return err
	}
	fmt.Printf("GTVP-PCR%d %x\n", c.cfg.PCR, pcr)
	var res struct {
		Verified bool   `json:"verified"`
		Reason   string `json:"reason"`
	}
	err = c.post("/boxattest/v1/quote", map[string]any{
		"nonce":        nonceHex,
		"quote":        b64(tpm2.Marshal(q.Quoted)),
		"signature":    b64(tpm2.Marshal(q.Signature)),
		"pcrs":         map[string]string{strconv.Itoa(c.cfg.PCR): hex.EncodeToString(pcr)},
		"measurements": c.readMeasurements(),
	}, &res)
	short := nonceHex
	if len(short) > 8 {
		short = short[:8]
	}
	if err != nil {
		return fmt.Errorf("quote nonce=%s: %w", short, err)
	}
	say("quoted nonce=%s verified=%t reason=%q", short, res.Verified, res.Reason)
	return nil
}

package webhook

import (
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

func TestSignaturesVerifyWithTheStandardLibrary(t *testing.T) {
	oldSecret, newSecret := NewSecret(), NewSecret()
	if !ValidSecret(oldSecret) || ValidSecret("whsec_short") || ValidSecret("nope") {
		t.Fatal("secret validation")
	}
	body := []byte(`{"id":"evt_1","type":"job.succeeded","data":{"id":"job_1"}}`)
	now := time.Now()
	sig := Sign([]string{newSecret, oldSecret}, "evt_1", now, body)
	if n := len(strings.Fields(sig)); n != 2 {
		t.Fatalf("%d signatures during a rotation, want 2", n)
	}
	h := http.Header{}
	h.Set("webhook-id", "evt_1")
	h.Set("webhook-timestamp", strconv.FormatInt(now.Unix(), 10))
	h.Set("webhook-signature", sig)
	for _, secret := range []string{oldSecret, newSecret} {
		wh, err := standardwebhooks.NewWebhook(secret)
		if err != nil {
			t.Fatal(err)
		}
		if err := wh.Verify(body, h); err != nil {
			t.Fatalf("a receiver holding one of the secrets rejects: %v", err)
		}
	}
	wh, _ := standardwebhooks.NewWebhook(NewSecret())
	if wh.Verify(body, h) == nil {
		t.Fatal("a stranger's secret verified")
	}
	h.Set("webhook-signature", Sign([]string{newSecret}, "evt_1", now, append(body, ' ')))
	if w, _ := standardwebhooks.NewWebhook(newSecret); w.Verify(body, h) == nil {
		t.Fatal("a signature over another body verified")
	}
}

func TestGuard(t *testing.T) {
	for _, tc := range []struct {
		ip              string
		strict, loop, p bool // allowed by default, with loopback, with private
	}{
		{"93.184.216.34", true, true, true},
		{"2606:4700::1111", true, true, true},
		{"127.0.0.1", false, true, true},
		{"::1", false, true, true},
		{"10.1.2.3", false, false, true},
		{"172.16.0.1", false, false, true},
		{"192.168.1.1", false, false, true},
		{"169.254.169.254", false, false, true},
		{"::ffff:169.254.169.254", false, false, true},
		{"fd00:ec2::254", false, false, true},
		{"100.64.0.1", false, false, true},
		{"0.0.0.0", false, false, true},
		{"224.0.0.1", false, false, true},
	} {
		ip := netip.MustParseAddr(tc.ip)
		if got := (Guard{}).Allowed(ip); got != tc.strict {
			t.Errorf("%s default: %v", tc.ip, got)
		}
		if got := (Guard{AllowLoopback: true}).Allowed(ip); got != tc.loop {
			t.Errorf("%s with loopback: %v", tc.ip, got)
		}
		if got := (Guard{AllowPrivate: true}).Allowed(ip); got != tc.p {
			t.Errorf("%s with private: %v", tc.ip, got)
		}
	}
	if err := (Guard{}).Check(t.Context(), "http://127.0.0.1:9/x"); err == nil {
		t.Fatal("loopback URL accepted")
	}
	if err := (Guard{}).Check(t.Context(), "ftp://example.com"); err == nil {
		t.Fatal("ftp accepted")
	}
}

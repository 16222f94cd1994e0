package webhook

import (
	"net/http"
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

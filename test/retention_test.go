package test

import (
	"bytes"
	"encoding/json"
	"io"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"

	"github.com/levee-gw/levee/test/harness"
)

// uploadWith uploads a one-line batch file with extra form fields, in order.
func uploadWith(t *testing.T, env *harness.Env, fields ...[2]string) (int, map[string]any) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	_ = mw.WriteField("purpose", "batch")
	for _, f := range fields {
		_ = mw.WriteField(f[0], f[1])
	}
	w, _ := mw.CreateFormFile("file", "in.jsonl")
	_, _ = w.Write(batchLines(1, "r"))
	_ = mw.Close()
	req, _ := http.NewRequest(http.MethodPost, env.BaseURL+"/v1/files", &buf)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("Authorization", "Bearer "+env.APIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out map[string]any
	_ = json.Unmarshal(raw, &out)
	return resp.StatusCode, out
}

// OpenAI's expires_after on upload: honoured, bounded, shown as
// expires_at; without it a batch file gets the 30 days OpenAI gives one.
func TestFileExpiresAfter(t *testing.T) {
	env := harness.Start(t, nil)
	num := func(o map[string]any, k string) int64 {
		v, _ := o[k].(float64)
		return int64(v)
	}
	code, f := uploadWith(t, env, [2]string{"expires_after[anchor]", "created_at"}, [2]string{"expires_after[seconds]", "7200"})
	if code != 200 || num(f, "expires_at")-num(f, "created_at") != 7200 {
		t.Fatalf("expires_after 7200: %d %v", code, f)
	}
	code, f = uploadWith(t, env)
	if code != 200 || num(f, "expires_at")-num(f, "created_at") != 30*24*3600 {
		t.Fatalf("default expiry: %d %v", code, f)
	}
	for _, bad := range [][][2]string{
		{{"expires_after[anchor]", "created_at"}, {"expires_after[seconds]", "3599"}},
		{{"expires_after[anchor]", "created_at"}, {"expires_after[seconds]", "2592001"}},
		{{"expires_after[anchor]", "created_at"}, {"expires_after[seconds]", "1e4"}},
		{{"expires_after[anchor]", "last_active_at"}, {"expires_after[seconds]", "7200"}},
		{{"expires_after[seconds]", "7200"}},
		{{"expires_after[anchor]", "created_at"}, {"expires_after[seconds]", "7200"}, {"expires_after[seconds]", "2592000"}},
		{{"purpose", "batch"}},
		// A value longer than a field holds is refused, not cut to what
		// looks valid ("7200", then spaces, then more).
		{{"expires_after[anchor]", "created_at"}, {"expires_after[seconds]", "7200" + strings.Repeat(" ", 70) + "99999999"}},
		{{"expires_after[anchor]", "created_at" + strings.Repeat(" ", 60) + "x"}, {"expires_after[seconds]", "7200"}},
	} {
		code, f := uploadWith(t, env, bad...)
		e, _ := f["error"].(map[string]any)
		if code != 400 || e == nil || e["param"] == nil {
			t.Errorf("%v: want 400 naming the field, got %d %v", bad, code, f)
		}
	}
}

package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

func batchLines(n int, prefix string) []byte {
	var b bytes.Buffer
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, `{"custom_id":"%s%d","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"line %d"}]}}`+"\n", prefix, i, i)
	}
	return b.Bytes()
}

// The official SDK's documented batch flow, unmodified: upload, create, poll
// until completed, download the output; and cancel a second batch midway.
func TestBatchFlowWithOpenAIGoSDK(t *testing.T) {
	env := harness.Start(t, slowFile(0, 1<<30))
	ctx := context.Background()
	c := openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithAPIKey(env.APIKey))

	const n = 200
	f, err := c.Files.New(ctx, openai.FileNewParams{File: openai.File(bytes.NewReader(batchLines(n, "r")), "input.jsonl", "application/jsonl"), Purpose: openai.FilePurposeBatch})
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Batches.New(ctx, openai.BatchNewParams{InputFileID: f.ID, Endpoint: openai.BatchNewParamsEndpointV1ChatCompletions,
		CompletionWindow: openai.BatchNewParamsCompletionWindow24h, Metadata: map[string]string{"run": "sdk"}})
	if err != nil {
		t.Fatal(err)
	}
	if b.Status != "validating" && b.Status != "in_progress" {
		t.Fatalf("new batch is %s", b.Status)
	}
	harness.Eventually(t, 30*time.Second, "the batch to complete", func() bool {
		b, err = c.Batches.Get(ctx, b.ID)
		return err == nil && b.Status == "completed"
	})
	if b.RequestCounts.Total != n || b.RequestCounts.Completed != n || b.RequestCounts.Failed != 0 || b.OutputFileID == "" || b.CompletedAt == 0 {
		t.Fatalf("completed batch: %+v", b)
	}
	resp, err := c.Files.Content(ctx, b.OutputFileID)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	seen := map[string]int{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var line struct {
			ID       string `json:"id"`
			CustomID string `json:"custom_id"`
			Response struct {
				StatusCode int             `json:"status_code"`
				Body       json.RawMessage `json:"body"`
			} `json:"response"`
			Error any `json:"error"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil || line.Response.StatusCode != 200 || line.Error != nil || !strings.HasPrefix(line.ID, "batch_req_") {
			t.Fatalf("output line %s", sc.Text())
		}
		seen[line.CustomID]++
	}
	for i := 0; i < n; i++ {
		if seen[fmt.Sprintf("r%d", i)] != 1 {
			t.Fatalf("custom_id r%d appears %d times in the output", i, seen[fmt.Sprintf("r%d", i)])
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct custom_ids, want %d", len(seen), n)
	}
	// The input file streams back byte for byte.
	in, err := c.Files.Content(ctx, f.ID)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(in.Body)
	in.Body.Close()
	if !bytes.Equal(got, batchLines(n, "r")) {
		t.Fatal("input file content differs from the upload")
	}
	list, err := c.Batches.List(ctx, openai.BatchListParams{Limit: openai.Int(10)})
	if err != nil || len(list.Data) != 1 || list.Data[0].ID != b.ID {
		t.Fatalf("list: %v %+v", err, list)
	}
}

func TestBatchCancelMidway(t *testing.T) {
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 30, RPM: 1 << 30,
			Sim: sim.Deployment{TTFT: 100 * time.Millisecond, CompletionTokens: 5}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}, MaxTokens: 4096}},
		Worker: config.Worker{Concurrency: 4},
	}
	env := harness.Start(t, f)
	ctx := context.Background()
	c := openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithAPIKey(env.APIKey))
	file, err := c.Files.New(ctx, openai.FileNewParams{File: openai.File(bytes.NewReader(batchLines(400, "c")), "c.jsonl", "application/jsonl"), Purpose: openai.FilePurposeBatch})
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Batches.New(ctx, openai.BatchNewParams{InputFileID: file.ID, Endpoint: openai.BatchNewParamsEndpointV1ChatCompletions, CompletionWindow: openai.BatchNewParamsCompletionWindow24h})
	if err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 20*time.Second, "some lines to complete", func() bool {
		b, err = c.Batches.Get(ctx, b.ID)
		return err == nil && b.RequestCounts.Completed >= 10
	})
	b, err = c.Batches.Cancel(ctx, b.ID)
	if err != nil || (b.Status != "cancelling" && b.Status != "cancelled") {
		t.Fatalf("cancel: %v %+v", err, b)
	}
	callsAtCancel := env.Sim.Stats()["d"].Calls
	harness.Eventually(t, 20*time.Second, "the batch to be cancelled", func() bool {
		b, err = c.Batches.Get(ctx, b.ID)
		return err == nil && b.Status == "cancelled"
	})
	// At most the lines already running went upstream after the cancel.
	if extra := env.Sim.Stats()["d"].Calls - callsAtCancel; extra > 4 {
		t.Fatalf("%d calls went upstream after the cancel", extra)
	}
	if b.RequestCounts.Completed+b.RequestCounts.Failed != 400 || b.RequestCounts.Completed >= 400 || b.CancelledAt == 0 {
		t.Fatalf("cancelled batch counts: %+v", b.RequestCounts)
	}
	// Finished lines are still delivered; the rest are in the error file.
	out, err := c.Files.Content(ctx, b.OutputFileID)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(out.Body)
	out.Body.Close()
	if got := bytes.Count(raw, []byte("\n")); int64(got) != b.RequestCounts.Completed {
		t.Fatalf("output has %d lines, %d completed", got, b.RequestCounts.Completed)
	}
	errf, err := c.Files.Content(ctx, b.ErrorFileID)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ = io.ReadAll(errf.Body)
	errf.Body.Close()
	if !bytes.Contains(raw, []byte("batch_cancelled")) || int64(bytes.Count(raw, []byte("\n"))) != b.RequestCounts.Failed {
		t.Fatalf("error file: %d lines for %d failed", bytes.Count(raw, []byte("\n")), b.RequestCounts.Failed)
	}
}

func upload(t *testing.T, env *harness.Env, key string, content io.Reader, purpose string) (*http.Response, []byte) {
	t.Helper()
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		_ = mw.WriteField("purpose", purpose)
		w, _ := mw.CreateFormFile("file", "in.jsonl")
		_, _ = io.Copy(w, content)
		_ = mw.Close()
		_ = pw.Close()
	}()
	req, _ := http.NewRequest(http.MethodPost, env.BaseURL+"/v1/files", pr)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp, raw
}

func TestBatchBadInputs(t *testing.T) {
	env := harness.Start(t, nil)
	other := env.NewKey("tenant-b")
	good := batchLines(3, "g")
	for _, tc := range []struct {
		name    string
		content []byte
		purpose string
		status  int
		want    string
	}{
		{"malformed JSONL", []byte("{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{}}\nnot json\n"), "batch", 400, "line 2: not valid JSON"},
		{"duplicate custom_id", append(batchLines(2, "d"), batchLines(1, "d")...), "batch", 400, "was already used on line 1 (duplicate_custom_id)"},
		{"mixed url", append(good, []byte(`{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":{"model":"text-embedding-3-small","input":"a"}}`+"\n")...), "batch", 400, "line 4: every line must use the same url"},
		{"wrong method", []byte(`{"custom_id":"x","method":"GET","url":"/v1/chat/completions","body":{}}` + "\n"), "batch", 400, "method must be POST"},
		{"empty file", []byte("\n\n"), "batch", 400, "empty_file"},
		{"wrong purpose", good, "fine-tune", 400, "purpose must be batch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, raw := upload(t, env, env.APIKey, bytes.NewReader(tc.content), tc.purpose)
			if resp.StatusCode != tc.status || !strings.Contains(string(raw), tc.want) {
				t.Fatalf("%d %s", resp.StatusCode, raw)
			}
			mustEnvelope(t, raw)
		})
	}
	t.Run("oversized file", func(t *testing.T) {
		big := io.MultiReader(bytes.NewReader(good), io.LimitReader(&longLines{}, 201<<20))
		resp, raw := upload(t, env, env.APIKey, big, "batch")
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
	})
	resp, raw := upload(t, env, env.APIKey, bytes.NewReader(good), "batch")
	if resp.StatusCode != 200 {
		t.Fatalf("good upload: %d %s", resp.StatusCode, raw)
	}
	var f struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(raw, &f)
	for _, tc := range []struct {
		name   string
		key    string
		body   map[string]any
		status int
		param  string
	}{
		{"unknown input_file_id", env.APIKey, map[string]any{"input_file_id": "file-00000000-0000-0000-0000-000000000000", "endpoint": "/v1/chat/completions", "completion_window": "24h"}, 404, "file_id"},
		{"another tenant's file", other, map[string]any{"input_file_id": f.ID, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, 404, "file_id"},
		{"endpoint differs from the lines", env.APIKey, map[string]any{"input_file_id": f.ID, "endpoint": "/v1/embeddings", "completion_window": "24h"}, 400, "endpoint"},
		{"bad window", env.APIKey, map[string]any{"input_file_id": f.ID, "endpoint": "/v1/chat/completions", "completion_window": "1h"}, 400, "completion_window"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, raw := call(t, env.BaseURL, "/v1/batches", tc.key, tc.body)
			if resp.StatusCode != tc.status {
				t.Fatalf("%d %s", resp.StatusCode, raw)
			}
			if e := mustEnvelope(t, raw); deref(e.Error.Param) != tc.param {
				t.Fatalf("param %q, want %q", deref(e.Error.Param), tc.param)
			}
		})
	}
	if resp, _ := call(t, env.BaseURL, "/v1/files/"+f.ID, other, nil); resp.StatusCode != 404 {
		t.Fatalf("another tenant read the file: %d", resp.StatusCode)
	}
	// A line whose model is not served fails the batch, with its line number.
	resp, raw = upload(t, env, env.APIKey, strings.NewReader(`{"custom_id":"m","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}}`+"\n"), "batch")
	_ = json.Unmarshal(raw, &f)
	resp, raw = call(t, env.BaseURL, "/v1/batches", env.APIKey, map[string]any{"input_file_id": f.ID, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
	var b struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(raw, &b)
	harness.Eventually(t, 10*time.Second, "the batch to fail validation", func() bool {
		_, raw = call(t, env.BaseURL, "/v1/batches/"+b.ID, env.APIKey, nil)
		return strings.Contains(string(raw), `"status":"failed"`)
	})
	if !strings.Contains(string(raw), `"code":"model_not_found"`) || !strings.Contains(string(raw), `"line":1`) {
		t.Fatalf("failed batch errors: %s", raw)
	}
}

// longLines reads as endless 8 KiB lines: few enough lines that only the
// size limit can stop them.
type longLines struct{ n int }

func (l *longLines) Read(p []byte) (int, error) {
	for i := range p {
		l.n++
		p[i] = 'x'
		if l.n%8192 == 0 {
			p[i] = '\n'
		}
	}
	return len(p), nil
}

// `levee batch submit --wait` uploads, creates, follows and writes the output.
func TestBatchCLI(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the levee binary")
	}
	env := harness.Start(t, slowFile(0, 1<<30))
	dir := t.TempDir()
	in := dir + "/lines.jsonl"
	if err := os.WriteFile(in, batchLines(50, "cli"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := harness.Spawn(t, []string{"LEVEE_URL=" + env.BaseURL, "LEVEE_API_KEY=" + env.APIKey}, "batch", "submit", in, "--wait")
	done := make(chan error, 1)
	go func() { done <- p.Cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("levee batch submit: %v\n%s", err, p.Output())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("levee batch submit did not finish:\n%s", p.Output())
	}
	outText := p.Output()
	if !strings.Contains(outText, "50 completed, 0 failed") || !strings.Contains(outText, "[####") {
		t.Fatalf("output:\n%s", outText)
	}
	raw, err := os.ReadFile(dir + "/lines.output.jsonl")
	if err != nil || bytes.Count(raw, []byte("\n")) != 50 {
		t.Fatalf("output file: %v, %d lines", err, bytes.Count(raw, []byte("\n")))
	}
}

func createBatch(t *testing.T, env *harness.Env, content []byte, endpoint string) string {
	t.Helper()
	file := uploadFile(t, env, env.APIKey, content)
	resp, raw := call(t, env.BaseURL, "/v1/batches", env.APIKey, map[string]any{"input_file_id": file, "endpoint": endpoint, "completion_window": "24h"})
	if resp.StatusCode != 200 {
		t.Fatalf("create: %d %s", resp.StatusCode, raw)
	}
	var b struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(raw, &b)
	return b.ID
}

type batchState struct {
	Status        string `json:"status"`
	OutputFileID  string `json:"output_file_id"`
	ErrorFileID   string `json:"error_file_id"`
	ExpiredAt     *int64 `json:"expired_at"`
	RequestCounts struct {
		Total, Completed, Failed int
	} `json:"request_counts"`
}

func getBatch(t *testing.T, env *harness.Env, id string) batchState {
	_, raw := call(t, env.BaseURL, "/v1/batches/"+id, env.APIKey, nil)
	var b batchState
	_ = json.Unmarshal(raw, &b)
	return b
}

// A batch whose window passes is expired: unstarted lines go to the error
// file as batch_expired, finished ones are still delivered.
func TestBatchExpires(t *testing.T) {
	f := slowFile(0, 1<<30)
	f.Deployments[0].Sim = sim.Deployment{TTFT: 100 * time.Millisecond, CompletionTokens: 5}
	f.Worker = config.Worker{Concurrency: 2}
	env := harness.Start(t, f)
	id := createBatch(t, env, batchLines(200, "e"), "/v1/chat/completions")
	harness.Eventually(t, 20*time.Second, "some lines to finish", func() bool { return getBatch(t, env, id).RequestCounts.Completed >= 5 })
	// The 24 h window ends now.
	if _, err := env.Store.Pool().Exec(context.Background(), `UPDATE batches SET expires_at = now() WHERE id = $1`, strings.TrimPrefix(id, "batch_")); err != nil {
		t.Fatal(err)
	}
	var b batchState
	harness.Eventually(t, 20*time.Second, "the batch to expire", func() bool {
		b = getBatch(t, env, id)
		return b.Status == "expired"
	})
	if b.ExpiredAt == nil || b.RequestCounts.Completed == 0 || b.RequestCounts.Completed+b.RequestCounts.Failed != 200 || b.RequestCounts.Failed == 0 {
		t.Fatalf("expired batch: %+v", b)
	}
	_, out := call(t, env.BaseURL, "/v1/files/"+b.OutputFileID+"/content", env.APIKey, nil)
	_, errs := call(t, env.BaseURL, "/v1/files/"+b.ErrorFileID+"/content", env.APIKey, nil)
	if bytes.Count(out, []byte("\n")) != b.RequestCounts.Completed || bytes.Count(errs, []byte(`"batch_expired"`)) != b.RequestCounts.Failed {
		t.Fatalf("files: %d output lines for %d completed; %d batch_expired for %d failed",
			bytes.Count(out, []byte("\n")), b.RequestCounts.Completed, bytes.Count(errs, []byte(`"batch_expired"`)), b.RequestCounts.Failed)
	}
}

// Azure-style lines (url without /v1, body.model naming a deployment) run
// over every deployment of that deployment's model.
func TestAzureBatchLinesUseTheModelGroup(t *testing.T) {
	env := harness.Start(t, pair(1<<30, 1<<30))
	// The named deployment is down: the lines can only complete if they are
	// routed over its model's group.
	setFaults(t, env, "ptu", sim.Faults{Outage: true})
	var in bytes.Buffer
	for i := 0; i < 60; i++ {
		fmt.Fprintf(&in, `{"custom_id":"az%d","method":"POST","url":"/chat/completions","body":{"model":"ptu","max_tokens":5,"messages":[{"role":"user","content":"x %d"}]}}`+"\n", i, i)
	}
	id := createBatch(t, env, in.Bytes(), "/v1/chat/completions")
	harness.Eventually(t, 20*time.Second, "the batch to complete", func() bool { return getBatch(t, env, id).Status == "completed" })
	if b := getBatch(t, env, id); b.RequestCounts.Completed != 60 {
		t.Fatalf("%+v", b)
	}
	if st := env.Sim.Stats(); st["std"].Admitted != 60 {
		t.Fatalf("the standard deployment served %d of 60 lines", st["std"].Admitted)
	}
}

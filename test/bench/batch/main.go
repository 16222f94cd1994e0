// Command batch is `make bench-batch`: a 50,000-line batch end to end — the
// multipart upload, validation, every line a job on the queue, the workers,
// the output file — against a zero-latency simulator without limits, with
// the whole stack in this process. It checks that the counts and the output
// and error files match the input line for line (every custom_id exactly
// once), and reports the wall time and lines per second.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
)

func main() {
	n := flag.Int("lines", 50000, "lines in the batch")
	flag.Parse()
	if err := run(*n); err != nil {
		fmt.Fprintln(os.Stderr, "bench-batch:", err)
		os.Exit(1)
	}
}

func run(n int) error {
	ctx := context.Background()
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Provisioned, TPM: 1 << 40, RPM: 1 << 40,
			Sim: sim.Deployment{TPM: 0, CompletionTokens: 8}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}}},
	}
	s, stop, err := dev.StartEphemeral(ctx, f)
	if err != nil {
		return err
	}
	defer stop()
	var in bytes.Buffer
	for i := 0; i < n; i++ {
		fmt.Fprintf(&in, `{"custom_id":"req-%d","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Tag request %d"}]}}`+"\n", i, i)
	}
	do := func(method, path string, body io.Reader, ct string) ([]byte, int, error) {
		req, _ := http.NewRequest(method, s.BaseURL+path, body)
		req.Header.Set("Authorization", "Bearer "+s.APIKey)
		if ct != "" {
			req.Header.Set("Content-Type", ct)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, 0, err
		}
		defer resp.Body.Close()
		raw, err := io.ReadAll(resp.Body)
		return raw, resp.StatusCode, err
	}
	start := time.Now()
	var mp bytes.Buffer
	mw := multipart.NewWriter(&mp)
	_ = mw.WriteField("purpose", "batch")
	fw, _ := mw.CreateFormFile("file", "bench.jsonl")
	_, _ = fw.Write(in.Bytes())
	_ = mw.Close()
	raw, code, err := do(http.MethodPost, "/v1/files", &mp, mw.FormDataContentType())
	if err != nil || code != 200 {
		return fmt.Errorf("upload: %d %v %s", code, err, raw)
	}
	uploaded := time.Since(start)
	var file struct{ ID string }
	_ = json.Unmarshal(raw, &file)
	body, _ := json.Marshal(map[string]string{"input_file_id": file.ID, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
	raw, code, err = do(http.MethodPost, "/v1/batches", bytes.NewReader(body), "application/json")
	if err != nil || code != 200 {
		return fmt.Errorf("create: %d %v %s", code, err, raw)
	}
	var b struct {
		ID            string                                 `json:"id"`
		Status        string                                 `json:"status"`
		OutputFileID  string                                 `json:"output_file_id"`
		ErrorFileID   string                                 `json:"error_file_id"`
		RequestCounts struct{ Total, Completed, Failed int } `json:"request_counts"`
	}
	_ = json.Unmarshal(raw, &b)
	var inProgress time.Duration
	for b.Status != "completed" {
		if time.Since(start) > 15*time.Minute || b.Status == "failed" {
			return fmt.Errorf("batch %s after %v: %+v", b.Status, time.Since(start), b)
		}
		time.Sleep(100 * time.Millisecond)
		raw, _, _ = do(http.MethodGet, "/v1/batches/"+b.ID, nil, "")
		_ = json.Unmarshal(raw, &b)
		if inProgress == 0 && b.Status == "in_progress" {
			inProgress = time.Since(start)
		}
	}
	wall := time.Since(start)
	// Check the output line for line.
	seen := make(map[string]int, n)
	req, _ := http.NewRequest(http.MethodGet, s.BaseURL+"/v1/files/"+b.OutputFileID+"/content", nil)
	req.Header.Set("Authorization", "Bearer "+s.APIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l struct {
			CustomID string `json:"custom_id"`
			Response struct {
				StatusCode int `json:"status_code"`
			} `json:"response"`
		}
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil || l.Response.StatusCode != 200 {
			return fmt.Errorf("bad output line %s", sc.Text())
		}
		seen[l.CustomID]++
	}
	resp.Body.Close()
	raw, _, _ = do(http.MethodGet, "/v1/files/"+b.ErrorFileID+"/content", nil, "")
	errLines := bytes.Count(raw, []byte("\n"))
	missing, twice := 0, 0
	for i := 0; i < n; i++ {
		switch seen[fmt.Sprintf("req-%d", i)] {
		case 0:
			missing++
		case 1:
		default:
			twice++
		}
	}
	fmt.Printf("levee bench-batch: %d lines (%d bytes), zero-latency simulator without limits\n", n, in.Len())
	fmt.Printf("  upload+validation %v; in_progress after %v; completed after %v\n", uploaded.Round(time.Millisecond), inProgress.Round(time.Millisecond), wall.Round(time.Millisecond))
	fmt.Printf("  %.0f lines/s end to end\n", float64(n)/wall.Seconds())
	fmt.Printf("  request_counts total %d completed %d failed %d; output lines %d (missing %d, twice %d); error lines %d\n",
		b.RequestCounts.Total, b.RequestCounts.Completed, b.RequestCounts.Failed, len(seen), missing, twice, errLines)
	if b.RequestCounts.Total != n || b.RequestCounts.Completed != n || missing != 0 || twice != 0 || len(seen) != n || errLines != 0 {
		return fmt.Errorf("the batch does not match its input")
	}
	fmt.Println("  every custom_id exactly once: ok")
	return nil
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// batchClient talks to a Levee gateway's batch API.
type batchClient struct {
	base, key string
	hc        *http.Client
}

type batchObject struct {
	ID            string          `json:"id"`
	Status        string          `json:"status"`
	OutputFileID  string          `json:"output_file_id"`
	ErrorFileID   string          `json:"error_file_id"`
	Errors        json.RawMessage `json:"errors"`
	RequestCounts struct {
		Total     int `json:"total"`
		Completed int `json:"completed"`
		Failed    int `json:"failed"`
	} `json:"request_counts"`
}

func (c *batchClient) do(ctx context.Context, method, path string, body io.Reader, contentType string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.key)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		var e struct {
			Error struct{ Message string } `json:"error"`
		}
		raw, _ := io.ReadAll(resp.Body)
		if json.Unmarshal(raw, &e) == nil && e.Error.Message != "" {
			return fmt.Errorf("%s %s: %d: %s", method, path, resp.StatusCode, e.Error.Message)
		}
		return fmt.Errorf("%s %s: %d", method, path, resp.StatusCode)
	}
	if w, ok := out.(io.Writer); ok {
		_, err = io.Copy(w, resp.Body)
		return err
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func cmdBatch(ctx context.Context, args []string, out io.Writer, getenv func(string) string) error {
	usage := errors.New("usage: levee batch submit FILE.jsonl [--endpoint /v1/chat/completions] [--wait] [--output FILE] | levee batch status BATCH_ID")
	if len(args) == 0 {
		return usage
	}
	fs := flag.NewFlagSet("batch", flag.ContinueOnError)
	base := fs.String("url", envOr(getenv, "LEVEE_URL", "http://127.0.0.1:8080"), "Levee's base URL (LEVEE_URL)")
	key := fs.String("api-key", getenv("LEVEE_API_KEY"), "API key (LEVEE_API_KEY)")
	endpoint := fs.String("endpoint", "/v1/chat/completions", "the endpoint every line calls")
	wait := fs.Bool("wait", false, "show progress until the batch ends, then write its output")
	output := fs.String("output", "", "where to write the output (default FILE.output.jsonl)")
	sub := args[0]
	// Flags may come before or after the positional argument.
	var pos []string
	rest := args[1:]
	for len(rest) > 0 {
		if err := fs.Parse(rest); err != nil {
			return err
		}
		rest = fs.Args()
		if len(rest) > 0 {
			pos, rest = append(pos, rest[0]), rest[1:]
		}
	}
	if len(pos) != 1 || *key == "" {
		if *key == "" {
			return errors.New("an API key is needed: --api-key or LEVEE_API_KEY (levee dev prints one)")
		}
		return usage
	}
	c := &batchClient{base: strings.TrimRight(*base, "/"), key: *key, hc: &http.Client{Timeout: 10 * time.Minute}}
	switch sub {
	case "status":
		var b batchObject
		if err := c.do(ctx, http.MethodGet, "/v1/batches/"+pos[0], nil, "", &b); err != nil {
			return err
		}
		fmt.Fprintf(out, "%s %s: %d/%d completed, %d failed\n", b.ID, b.Status, b.RequestCounts.Completed, b.RequestCounts.Total, b.RequestCounts.Failed)
		return nil
	case "submit":
	default:
		return usage
	}
	path := pos[0]
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	// Stream the upload: the file is never read into memory whole.
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		_ = mw.WriteField("purpose", "batch")
		w, err := mw.CreateFormFile("file", filepath.Base(path))
		if err == nil {
			_, err = io.Copy(w, f)
		}
		if err == nil {
			err = mw.Close()
		}
		pw.CloseWithError(err)
	}()
	var file struct {
		ID string `json:"id"`
	}
	if err := c.do(ctx, http.MethodPost, "/v1/files", pr, mw.FormDataContentType(), &file); err != nil {
		return err
	}
	body, _ := json.Marshal(map[string]string{"input_file_id": file.ID, "endpoint": *endpoint, "completion_window": "24h"})
	var b batchObject
	if err := c.do(ctx, http.MethodPost, "/v1/batches", bytes.NewReader(body), "application/json", &b); err != nil {
		return err
	}
	fmt.Fprintf(out, "batch %s created from %s (%s)\n", b.ID, path, file.ID)
	if !*wait {
		return nil
	}
	start := time.Now()
	for {
		if err := c.do(ctx, http.MethodGet, "/v1/batches/"+b.ID, nil, "", &b); err != nil {
			return err
		}
		fmt.Fprint(os.Stderr, "\r"+progress(b, time.Since(start)))
		switch b.Status {
		case "completed", "expired", "cancelled", "failed":
			fmt.Fprintln(os.Stderr)
			return writeResults(ctx, c, b, path, *output, out)
		}
		select {
		case <-ctx.Done():
			fmt.Fprintln(os.Stderr)
			return fmt.Errorf("stopped waiting; the batch goes on: levee batch status %s", b.ID)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// progress renders one line: a bar, counts, rate and ETA.
func progress(b batchObject, elapsed time.Duration) string {
	rc := b.RequestCounts
	done := rc.Completed + rc.Failed
	const width = 30
	filled := 0
	if rc.Total > 0 {
		filled = width * done / rc.Total
	}
	rate := float64(done) / max(elapsed.Seconds(), 0.001)
	eta := "?"
	if rate > 0 && rc.Total > 0 {
		eta = (time.Duration(float64(rc.Total-done)/rate) * time.Second).Round(time.Second).String()
	}
	return fmt.Sprintf("[%s%s] %d/%d done, %d failed  %.0f/s  ETA %s  %-11s", strings.Repeat("#", filled), strings.Repeat("-", width-filled),
		done, rc.Total, rc.Failed, rate, eta, b.Status)
}

func writeResults(ctx context.Context, c *batchClient, b batchObject, input, output string, out io.Writer) error {
	if b.Status == "failed" {
		return fmt.Errorf("batch %s failed validation: %s", b.ID, b.Errors)
	}
	if output == "" {
		output = strings.TrimSuffix(input, filepath.Ext(input)) + ".output.jsonl"
	}
	write := func(id, path string) error {
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		defer f.Close()
		return c.do(ctx, http.MethodGet, "/v1/files/"+id+"/content", nil, "", f)
	}
	if err := write(b.OutputFileID, output); err != nil {
		return err
	}
	fmt.Fprintf(out, "batch %s %s: %d completed, %d failed; output written to %s\n", b.ID, b.Status, b.RequestCounts.Completed, b.RequestCounts.Failed, output)
	if b.RequestCounts.Failed > 0 {
		errPath := strings.TrimSuffix(output, ".output.jsonl") + ".errors.jsonl"
		if err := write(b.ErrorFileID, errPath); err != nil {
			return err
		}
		fmt.Fprintf(out, "errors written to %s\n", errPath)
	}
	return nil
}

func envOr(getenv func(string) string, k, def string) string {
	if v := getenv(k); v != "" {
		return v
	}
	return def
}

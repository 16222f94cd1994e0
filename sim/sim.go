// Package sim is a test double of Azure OpenAI (and of an OpenAI-compatible
// endpoint): the same paths, per-deployment token and request limits charged
// on arrival over sliding windows, Azure's 429 body and headers, a latency
// model, real SSE streaming with the usage chunk, deterministic content, and
// faults that can be changed while it runs. It counts every call it admitted
// and refused so tests can prove what a gateway did to it.
package sim

import (
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	jsonv2 "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
	"github.com/tiktoken-go/tokenizer"
)

// Deployment configures one simulated deployment.
type Deployment struct {
	Name  string `yaml:"name" json:"name"`
	Model string `yaml:"model" json:"model"`
	// Kind is provisioned or standard; provisioned ones report utilization.
	Kind   string `yaml:"kind" json:"kind"`
	Region string `yaml:"region" json:"region"`
	// TPM is tokens per sliding minute; 0 means unlimited (and then RPM too).
	TPM int `yaml:"tpm" json:"tpm"`
	// RPM defaults to 6 per 1,000 TPM, enforced per 10 s as RPM/6.
	RPM int `yaml:"rpm" json:"rpm"`
	// TTFT is the mean time to first token, PerToken the mean time per
	// completion token, Embedding the mean time of an embeddings call; each is
	// drawn from a normal distribution with relative spread Jitter.
	TTFT      time.Duration `yaml:"ttft" json:"ttft"`
	PerToken  time.Duration `yaml:"per_token" json:"per_token"`
	Embedding time.Duration `yaml:"embedding" json:"embedding"`
	Jitter    float64       `yaml:"jitter" json:"jitter"`
	// CompletionTokens is the typical completion length (the real one is
	// derived from the prompt, within ±50 %, and capped by max_tokens).
	CompletionTokens int `yaml:"completion_tokens" json:"completion_tokens"`
	// DefaultMaxTokens is charged for a call that sets no max_tokens.
	DefaultMaxTokens int `yaml:"default_max_tokens" json:"default_max_tokens"`
}

// Faults are injected behaviours, changeable at run time.
type Faults struct {
	// ErrorRate is the share of calls answered 500.
	ErrorRate float64 `json:"error_rate"`
	// Outage answers every call 503.
	Outage bool `json:"outage"`
	// Delay is added before the first byte of every call.
	Delay time.Duration `json:"delay"`
}

// Stats are a deployment's counters since start (or the last reset).
type Stats struct {
	Calls    int64 `json:"calls"`
	Admitted int64 `json:"admitted"`
	// Refused are 429s for tokens or requests.
	Refused int64 `json:"refused"`
	// Faulted are calls answered with an injected error.
	Faulted        int64 `json:"faulted"`
	Cancelled      int64 `json:"cancelled"`
	TokensAdmitted int64 `json:"tokens_admitted"`
	// PeakTokens is the most tokens the sliding minute ever held after an
	// admission; it can never exceed TPM, since admission is refused beyond it.
	PeakTokens int64 `json:"peak_tokens"`
	// PeakDemand is the most the minute would have held had every call been
	// admitted: what a gateway asked for, refused or not.
	PeakDemand int64 `json:"peak_demand"`
	// WindowTokens is what the sliding minute holds now: WindowTokens/TPM
	// is the deployment's utilization at this moment.
	WindowTokens int64 `json:"window_tokens"`
	TPM          int64 `json:"tpm"`
	RequestLimit int64 `json:"requests_per_10s"`
}

// Config is the simulator's whole configuration.
type Config struct {
	// APIKey is the key every deployment accepts (api-key or Bearer).
	APIKey      string       `yaml:"api_key" json:"api_key"`
	Deployments []Deployment `yaml:"deployments" json:"deployments"`
}

type entry struct {
	at     time.Time
	tokens int64
}

type deployment struct {
	Deployment
	codec  tokenizer.Codec
	mu     sync.Mutex
	tokLog []entry // admitted charges in the last minute, oldest first
	tokSum int64
	reqLog []time.Time // admitted requests in the last 10 s
	faults Faults
	reqLim int64

	seen []http.Header // the last few calls' headers, for tests

	calls, admitted, refused, faulted, cancelled, tokensAdmitted atomic.Int64
	peakTokens, peakDemand                                       int64
}

// Server is the simulator; it is an http.Handler.
type Server struct {
	key    string
	deps   map[string]*deployment
	mux    *http.ServeMux
	stored responseStore
}

// New builds a simulator.
func New(cfg Config) (*Server, error) {
	s := &Server{key: cfg.APIKey, deps: map[string]*deployment{}, mux: http.NewServeMux()}
	for _, d := range cfg.Deployments {
		if d.Name == "" {
			return nil, fmt.Errorf("sim: deployment without a name")
		}
		if d.Model == "" {
			d.Model = d.Name
		}
		if d.RPM == 0 {
			d.RPM = 6 * d.TPM / 1000
		}
		if d.CompletionTokens == 0 {
			d.CompletionTokens = 20
		}
		if d.DefaultMaxTokens == 0 {
			d.DefaultMaxTokens = 1024
		}
		if d.Region == "" {
			d.Region = "simulated"
		}
		enc := tokenizer.Cl100kBase
		if strings.HasPrefix(d.Model, "gpt-4o") || strings.HasPrefix(d.Model, "gpt-4.1") || strings.HasPrefix(d.Model, "gpt-5") || strings.HasPrefix(d.Model, "o") {
			enc = tokenizer.O200kBase
		}
		codec, err := tokenizer.Get(enc)
		if err != nil {
			return nil, fmt.Errorf("sim: %w", err)
		}
		s.deps[d.Name] = &deployment{Deployment: d, codec: codec, reqLim: int64(math.Ceil(float64(d.RPM) / 6))}
	}
	s.mux.HandleFunc("POST /openai/deployments/{dep}/{op...}", s.azure)
	s.mux.HandleFunc("POST /openai/v1/{op...}", s.byModel)
	s.mux.HandleFunc("POST /v1/{op...}", s.byModel)
	s.mux.HandleFunc("POST /openai/responses", s.byModel) // the older surface, with api-version
	for _, p := range []string{"/openai/v1/responses/{id}", "/v1/responses/{id}", "/openai/responses/{id}"} {
		s.mux.HandleFunc("GET "+p, s.storedResponse)
		s.mux.HandleFunc("DELETE "+p, s.storedResponse)
		s.mux.HandleFunc("GET "+p+"/input_items", s.storedResponse)
	}
	s.mux.HandleFunc("GET /sim/stats", s.stats)
	s.mux.HandleFunc("PUT /sim/deployments/{dep}/faults", s.setFaults)
	s.mux.HandleFunc("POST /sim/reset", s.reset)
	return s, nil
}

// A /resources/{name} prefix addresses one resource of many on this one
// server (each with its own stored responses), as each Azure resource is
// its own endpoint.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mux.ServeHTTP(w, withResource(r))
}

// SetFaults changes a deployment's injected faults.
func (s *Server) SetFaults(name string, f Faults) bool {
	d, ok := s.deps[name]
	if !ok {
		return false
	}
	d.mu.Lock()
	d.faults = f
	d.mu.Unlock()
	return true
}

// Stats returns every deployment's counters.
func (s *Server) Stats() map[string]Stats {
	out := map[string]Stats{}
	now := time.Now()
	for name, d := range s.deps {
		d.mu.Lock()
		d.prune(now)
		st := Stats{
			Calls: d.calls.Load(), Admitted: d.admitted.Load(), Refused: d.refused.Load(),
			Faulted: d.faulted.Load(), Cancelled: d.cancelled.Load(), TokensAdmitted: d.tokensAdmitted.Load(),
			PeakTokens: d.peakTokens, PeakDemand: d.peakDemand, TPM: int64(d.TPM), RequestLimit: d.reqLim, WindowTokens: d.tokSum,
		}
		d.mu.Unlock()
		out[name] = st
	}
	return out
}

const seenLimit = 64

// Seen returns the headers of the last calls a deployment received.
func (s *Server) Seen(name string) []http.Header {
	d, ok := s.deps[name]
	if !ok {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]http.Header(nil), d.seen...)
}

// Reset clears counters, windows and faults.
func (s *Server) Reset() {
	for _, d := range s.deps {
		d.mu.Lock()
		d.tokLog, d.tokSum, d.reqLog, d.faults = nil, 0, nil, Faults{}
		d.peakTokens, d.peakDemand = 0, 0
		d.mu.Unlock()
		for _, c := range []*atomic.Int64{&d.calls, &d.admitted, &d.refused, &d.faulted, &d.cancelled, &d.tokensAdmitted} {
			c.Store(0)
		}
	}
}

func (s *Server) stats(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, s.Stats()) }

func (s *Server) setFaults(w http.ResponseWriter, r *http.Request) {
	// delay is a Go duration ("2s") or nanoseconds.
	var in struct {
		Faults
		Delay json.RawMessage `json:"delay"`
	}
	if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
		azureError(w, 400, "400", "invalid faults: "+err.Error())
		return
	}
	f := in.Faults
	if len(in.Delay) > 0 {
		var s string
		if json.Unmarshal(in.Delay, &s) == nil {
			d, err := time.ParseDuration(s)
			if err != nil {
				azureError(w, 400, "400", "invalid faults: "+err.Error())
				return
			}
			f.Delay = d
		} else if err := json.Unmarshal(in.Delay, &f.Delay); err != nil {
			azureError(w, 400, "400", "invalid faults: delay must be a duration such as \"2s\"")
			return
		}
	}
	if !s.SetFaults(r.PathValue("dep"), f) {
		azureError(w, 404, "DeploymentNotFound", "no such deployment")
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) reset(w http.ResponseWriter, _ *http.Request) {
	s.Reset()
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) authorized(r *http.Request) bool {
	if s.key == "" {
		return true
	}
	if k := r.Header.Get("api-key"); k != "" {
		return k == s.key
	}
	return r.Header.Get("Authorization") == "Bearer "+s.key
}

func (s *Server) azure(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("api-version") == "" {
		azureError(w, 404, "404", "Resource not found")
		return
	}
	s.serve(w, r, r.PathValue("dep"), r.PathValue("op"), true, nil)
}

func (s *Server) byModel(w http.ResponseWriter, r *http.Request) {
	body, err := readBody(r)
	if err != nil {
		azureError(w, 400, "400", err.Error())
		return
	}
	var m struct {
		Model string `json:"model"`
	}
	_ = readJSON(body, &m)
	op := r.PathValue("op")
	if r.URL.Path == "/openai/responses" {
		if r.URL.Query().Get("api-version") == "" {
			azureError(w, 404, "404", "Resource not found")
			return
		}
		op = "responses"
	}
	s.serve(w, r, m.Model, op, false, body)
}

// readJSON reads a request the way the real service does: member names
// match exactly, and a repeated name's last value wins (Python's json, and
// most servers). Go's encoding/json would match names case-insensitively,
// which no upstream does.
func readJSON(data []byte, v any) error {
	return jsonv2.Unmarshal(data, v, jsontext.AllowDuplicateNames(true))
}

func readBody(r *http.Request) ([]byte, error) {
	return io.ReadAll(http.MaxBytesReader(nil, r.Body, 64<<20))
}

type request struct {
	Messages []struct {
		Role    string          `json:"role"`
		Name    string          `json:"name"`
		Content json.RawMessage `json:"content"`
	} `json:"messages"`
	Prompt              json.RawMessage `json:"prompt"`
	Input               json.RawMessage `json:"input"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	N                   int             `json:"n"`
	BestOf              int             `json:"best_of"`
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Dimensions int `json:"dimensions"`
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request, depName, op string, azureStyle bool, body []byte) {
	d, ok := s.deps[depName]
	if !ok {
		azureError(w, 404, "DeploymentNotFound", "The API deployment for this resource does not exist.")
		return
	}
	d.calls.Add(1)
	d.mu.Lock()
	if len(d.seen) == seenLimit {
		d.seen = d.seen[1:]
	}
	d.seen = append(d.seen, r.Header.Clone())
	d.mu.Unlock()
	if !s.authorized(r) {
		azureError(w, 401, "401", "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.")
		return
	}
	if op != "chat/completions" && op != "completions" && op != "embeddings" && op != "responses" {
		azureError(w, 404, "404", "Resource not found")
		return
	}
	if body == nil {
		var err error
		if body, err = readBody(r); err != nil {
			azureError(w, 400, "400", err.Error())
			return
		}
	}
	var req request
	if err := readJSON(body, &req); err != nil {
		azureError(w, 400, "400", "Invalid JSON body: "+err.Error())
		return
	}
	var (
		rreq *responsesRequest
		prev *storedResponse
	)
	prompt := d.promptTokens(op, &req)
	maxTok := d.DefaultMaxTokens
	if req.MaxTokens != nil {
		maxTok = *req.MaxTokens
	}
	if req.MaxCompletionTokens != nil {
		maxTok = *req.MaxCompletionTokens
	}
	if op == "responses" {
		rreq = &responsesRequest{}
		if err := readJSON(body, rreq); err != nil {
			openAIError(w, 400, "invalid_request_error", "", "", "Invalid JSON body: "+err.Error())
			return
		}
		if id := rreq.PreviousResponseID; id != nil {
			// Stored state is the resource's own: another one has none.
			if prev = s.stored.get(resourceOf(r), *id); prev == nil {
				openAIError(w, 404, "invalid_request_error", "previous_response_id", "previous_response_not_found",
					fmt.Sprintf("Previous response with id '%s' not found.", *id))
				return
			}
		}
		prompt = d.responsesPrompt(rreq)
		if prev != nil {
			prompt += prev.context
		}
		maxTok = d.DefaultMaxTokens
		if rreq.MaxOutputTokens != nil {
			maxTok = *rreq.MaxOutputTokens
		}
	}
	n := max(req.N, req.BestOf, 1)
	charge := int64(prompt)
	if op != "embeddings" {
		charge += int64(maxTok * n)
	}

	d.mu.Lock()
	f := d.faults
	d.mu.Unlock()
	if f.Delay > 0 && !sleep(r, f.Delay) {
		d.cancelled.Add(1)
		return
	}
	if f.Outage {
		d.faulted.Add(1)
		azureError(w, 503, "ServiceUnavailable", "The service is temporarily unable to process your request. Please try again later.")
		return
	}
	if f.ErrorRate > 0 && rand.Float64() < f.ErrorRate {
		d.faulted.Add(1)
		azureError(w, 500, "InternalServerError", "The server had an error while processing your request. Sorry about that!")
		return
	}

	remTok, remReq, retry, ok := d.admit(time.Now(), charge)
	if !ok {
		d.refused.Add(1)
		secs := int(math.Ceil(retry.Seconds()))
		w.Header().Set("retry-after", strconv.Itoa(secs))
		w.Header().Set("retry-after-ms", strconv.FormatInt(retry.Milliseconds(), 10))
		w.Header().Set("x-ratelimit-reset-tokens", strconv.Itoa(secs))
		azureError(w, 429, "429", fmt.Sprintf("Requests to the %s Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after %d seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.", opName(op), secs))
		return
	}
	d.admitted.Add(1)
	d.tokensAdmitted.Add(charge)

	id := idFor(body)
	h := w.Header()
	h.Set("x-ratelimit-remaining-tokens", strconv.FormatInt(remTok, 10))
	h.Set("x-ratelimit-remaining-requests", strconv.FormatInt(remReq, 10))
	h.Set("x-request-id", id)
	h.Set("apim-request-id", id)
	h.Set("x-ms-region", d.Region)
	if d.Kind == "provisioned" && d.TPM > 0 {
		h.Set("azure-openai-deployment-utilization", fmt.Sprintf("%.1f%%", 100*float64(int64(d.TPM)-remTok)/float64(d.TPM)))
	}

	if op == "responses" {
		s.respond(w, r, d, rreq, prev, id, prompt, maxTok)
		return
	}
	if op == "embeddings" {
		if !sleep(r, d.draw(d.Embedding)) {
			d.cancelled.Add(1)
			return
		}
		d.embeddings(w, &req, prompt)
		return
	}
	completion := d.completionLength(&req, maxTok)
	if req.Stream {
		d.stream(w, r, op, &req, azureStyle, id, prompt, completion, n, maxTok)
		return
	}
	if !sleep(r, d.draw(d.TTFT)+time.Duration(completion*n)*d.draw(d.PerToken)) {
		d.cancelled.Add(1)
		return
	}
	d.complete(w, op, azureStyle, id, prompt, completion, n, maxTok)
}

func opName(op string) string {
	switch op {
	case "embeddings":
		return "Embeddings_Create"
	case "completions":
		return "Completions_Create"
	}
	return "ChatCompletions_Create"
}

// admit charges a call if the minute and the 10-second window both have
// room; otherwise it says how long until they will.
func (d *deployment) admit(now time.Time, charge int64) (remTok, remReq int64, retry time.Duration, ok bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.TPM <= 0 {
		return math.MaxInt32, math.MaxInt32, 0, true
	}
	d.prune(now)
	if demand := d.tokSum + charge; demand > d.peakDemand {
		d.peakDemand = demand
	}
	tpm := int64(d.TPM)
	if d.tokSum+charge > tpm || int64(len(d.reqLog))+1 > d.reqLim {
		retry = time.Second
		if d.tokSum+charge > tpm {
			left := d.tokSum
			for _, e := range d.tokLog {
				left -= e.tokens
				if left+charge <= tpm {
					retry = e.at.Add(time.Minute).Sub(now)
					break
				}
			}
			if charge > tpm {
				retry = time.Minute
			}
		}
		if int64(len(d.reqLog))+1 > d.reqLim && len(d.reqLog) > 0 {
			if rr := d.reqLog[0].Add(10 * time.Second).Sub(now); rr > retry {
				retry = rr
			}
		}
		return 0, 0, max(retry, time.Millisecond), false
	}
	d.tokLog = append(d.tokLog, entry{now, charge})
	d.tokSum += charge
	d.reqLog = append(d.reqLog, now)
	if d.tokSum > d.peakTokens {
		d.peakTokens = d.tokSum
	}
	return tpm - d.tokSum, d.reqLim - int64(len(d.reqLog)), 0, true
}

// prune drops charges older than their windows; d.mu must be held.
func (d *deployment) prune(now time.Time) {
	minute, tenS := now.Add(-time.Minute), now.Add(-10*time.Second)
	i := 0
	for i < len(d.tokLog) && !d.tokLog[i].at.After(minute) {
		d.tokSum -= d.tokLog[i].tokens
		i++
	}
	d.tokLog = d.tokLog[i:]
	j := 0
	for j < len(d.reqLog) && !d.reqLog[j].After(tenS) {
		j++
	}
	d.reqLog = d.reqLog[j:]
}

func (d *deployment) count(s string) int {
	if s == "" {
		return 0
	}
	n, err := d.codec.Count(s)
	if err != nil {
		return len(s) / 4
	}
	return n
}

// promptTokens counts the prompt as OpenAI's cookbook does for chat.
func (d *deployment) promptTokens(op string, req *request) int {
	switch op {
	case "chat/completions":
		n := 3
		for _, m := range req.Messages {
			n += 3 + d.count(m.Role) + d.contentTokens(m.Content)
			if m.Name != "" {
				n += 1 + d.count(m.Name)
			}
		}
		return n
	case "completions":
		return d.textTokens(req.Prompt)
	default:
		return d.textTokens(req.Input)
	}
}

func (d *deployment) contentTokens(raw json.RawMessage) int {
	var s string
	if readJSON(raw, &s) == nil {
		return d.count(s)
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if readJSON(raw, &parts) == nil {
		n := 0
		for _, p := range parts {
			switch p.Type {
			case "text", "input_text", "output_text":
				n += d.count(p.Text)
			case "image_url", "input_image":
				n += 85
			default:
				n += len(p.Text)/4 + 1
			}
		}
		return n
	}
	return len(raw) / 4
}

func (d *deployment) textTokens(raw json.RawMessage) int {
	var s string
	if readJSON(raw, &s) == nil {
		return d.count(s)
	}
	var many []json.RawMessage
	if readJSON(raw, &many) != nil {
		return len(raw) / 4
	}
	n := 0
	for _, m := range many {
		if readJSON(m, &s) == nil {
			n += d.count(s)
		} else if len(m) > 0 && m[0] == '[' {
			var ids []int
			_ = readJSON(m, &ids)
			n += len(ids)
		} else {
			n++
		}
	}
	return n
}

// completionLength is deterministic in the prompt (streamed or not, the same
// prompt gets the same answer): CompletionTokens ±50 %, capped by max_tokens.
func (d *deployment) completionLength(req *request, maxTok int) int {
	h := sha256.New()
	for _, m := range req.Messages {
		h.Write([]byte(m.Role))
		h.Write(m.Content)
	}
	h.Write(req.Prompt)
	var sum [32]byte
	h.Sum(sum[:0])
	lo := max(d.CompletionTokens/2, 1)
	span := d.CompletionTokens + 1
	n := lo + int(binary.BigEndian.Uint32(sum[:4])%uint32(span))
	return max(min(n, maxTok), 0)
}

func (d *deployment) draw(mean time.Duration) time.Duration {
	if mean <= 0 {
		return 0
	}
	v := float64(mean) * (1 + d.Jitter*rand.NormFloat64())
	return time.Duration(max(v, 0))
}

func sleep(r *http.Request, dur time.Duration) bool {
	if dur <= 0 {
		return r.Context().Err() == nil
	}
	t := time.NewTimer(dur)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-r.Context().Done():
		return false
	}
}

// idFor is a fresh random id: identical calls must not share one (a
// stored response would overwrite another).
func idFor([]byte) string {
	var b [12]byte
	_, _ = crand.Read(b[:])
	return fmt.Sprintf("%x", b)
}

var words = []string{" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."}

func content(tokens int) string {
	var b strings.Builder
	for i := 0; i < tokens; i++ {
		b.WriteString(words[i%len(words)])
	}
	return b.String()
}

func finish(completion, maxTok int) string {
	if completion >= maxTok {
		return "length"
	}
	return "stop"
}

func (d *deployment) complete(w http.ResponseWriter, op string, azureStyle bool, id string, prompt, completion, n, maxTok int) {
	usage := map[string]int{"prompt_tokens": prompt, "completion_tokens": completion * n, "total_tokens": prompt + completion*n}
	choices := make([]map[string]any, n)
	for i := range choices {
		if op == "completions" {
			choices[i] = map[string]any{"index": i, "text": content(completion), "finish_reason": finish(completion, maxTok), "logprobs": nil}
		} else {
			choices[i] = map[string]any{"index": i, "message": map[string]any{"role": "assistant", "content": content(completion), "refusal": nil}, "finish_reason": finish(completion, maxTok), "logprobs": nil}
		}
	}
	obj, prefix := "chat.completion", "chatcmpl-"
	if op == "completions" {
		obj, prefix = "text_completion", "cmpl-"
	}
	resp := map[string]any{"id": prefix + id, "object": obj, "created": time.Now().Unix(), "model": d.Model,
		"system_fingerprint": "fp_levee_sim", "choices": choices, "usage": usage}
	if azureStyle {
		resp["prompt_filter_results"] = []map[string]any{{"prompt_index": 0, "content_filter_results": map[string]any{}}}
	}
	writeJSON(w, 200, resp)
}

func (d *deployment) stream(w http.ResponseWriter, r *http.Request, op string, req *request, azureStyle bool, id string, prompt, completion, n, maxTok int) {
	fl, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(200)
	created := time.Now().Unix()
	obj, prefix := "chat.completion.chunk", "chatcmpl-"
	if op == "completions" {
		obj, prefix = "text_completion", "cmpl-"
	}
	send := func(v any) bool {
		b, _ := json.Marshal(v)
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return false
		}
		if fl != nil {
			fl.Flush()
		}
		return true
	}
	chunk := func(choices []map[string]any) map[string]any {
		return map[string]any{"id": prefix + id, "object": obj, "created": created, "model": d.Model,
			"system_fingerprint": "fp_levee_sim", "choices": choices, "usage": nil}
	}
	if !sleep(r, d.draw(d.TTFT)) {
		d.cancelled.Add(1)
		return
	}
	if azureStyle {
		// Azure's first chunk: no choices, only the prompt filter results.
		c := chunk([]map[string]any{})
		c["prompt_filter_results"] = []map[string]any{{"prompt_index": 0, "content_filter_results": map[string]any{}}}
		if !send(c) {
			return
		}
	}
	if op == "chat/completions" {
		for i := 0; i < n; i++ {
			if !send(chunk([]map[string]any{{"index": i, "delta": map[string]any{"role": "assistant", "content": ""}, "finish_reason": nil, "logprobs": nil}})) {
				return
			}
		}
	}
	for t := 0; t < completion; t++ {
		if !sleep(r, d.draw(d.PerToken)) {
			d.cancelled.Add(1)
			return
		}
		for i := 0; i < n; i++ {
			var c map[string]any
			if op == "completions" {
				c = map[string]any{"index": i, "text": words[t%len(words)], "finish_reason": nil, "logprobs": nil}
			} else {
				c = map[string]any{"index": i, "delta": map[string]any{"content": words[t%len(words)]}, "finish_reason": nil, "logprobs": nil}
			}
			if !send(chunk([]map[string]any{c})) {
				return
			}
		}
	}
	for i := 0; i < n; i++ {
		c := map[string]any{"index": i, "delta": map[string]any{}, "finish_reason": finish(completion, maxTok), "logprobs": nil}
		if op == "completions" {
			c = map[string]any{"index": i, "text": "", "finish_reason": finish(completion, maxTok), "logprobs": nil}
		}
		if !send(chunk([]map[string]any{c})) {
			return
		}
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		c := chunk([]map[string]any{})
		c["usage"] = map[string]int{"prompt_tokens": prompt, "completion_tokens": completion * n, "total_tokens": prompt + completion*n}
		if !send(c) {
			return
		}
	}
	_, _ = fmt.Fprint(w, "data: [DONE]\n\n")
	if fl != nil {
		fl.Flush()
	}
}

func (d *deployment) embeddings(w http.ResponseWriter, req *request, prompt int) {
	var inputs []json.RawMessage
	if readJSON(req.Input, &inputs) != nil || (len(inputs) > 0 && inputs[0][0] != '"' && inputs[0][0] != '[') {
		inputs = []json.RawMessage{req.Input}
	}
	dims := req.Dimensions
	if dims <= 0 {
		dims = 8
	}
	data := make([]map[string]any, len(inputs))
	for i, in := range inputs {
		sum := sha256.Sum256(in)
		vec := make([]float64, dims)
		for k := range vec {
			vec[k] = float64(int(sum[k%32])-128) / 128
		}
		data[i] = map[string]any{"object": "embedding", "index": i, "embedding": vec}
	}
	writeJSON(w, 200, map[string]any{"object": "list", "data": data, "model": d.Model,
		"usage": map[string]int{"prompt_tokens": prompt, "total_tokens": prompt}})
}

func azureError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, map[string]any{"error": map[string]any{"code": code, "message": msg}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

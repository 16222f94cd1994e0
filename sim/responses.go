package sim

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"
)

// The Responses API as Azure OpenAI serves it on /openai/v1/responses (and
// OpenAI on /v1/responses): a response stored (store, default true) lives on
// the resource that made it — the endpoint, here /resources/{name}/… — and
// only there: a previous_response_id, a GET, DELETE or input_items of it on
// any other resource is a 404, as it is on the real service.

type resourceKey struct{}

// resourceOf is the resource a request was addressed to ("" without a
// /resources/{name} prefix).
func resourceOf(r *http.Request) string {
	v, _ := r.Context().Value(resourceKey{}).(string)
	return v
}

// withResource strips a /resources/{name} prefix into the context.
func withResource(r *http.Request) *http.Request {
	rest, ok := strings.CutPrefix(r.URL.Path, "/resources/")
	if !ok {
		return r
	}
	name, path, _ := strings.Cut(rest, "/")
	r2 := r.Clone(context.WithValue(r.Context(), resourceKey{}, name))
	r2.URL.Path = "/" + path
	r2.URL.RawPath = ""
	return r2
}

type storedResponse struct {
	obj        map[string]any
	inputItems []map[string]any
	// context is what a follow-up carries as input: this turn's input and
	// output, and its own context.
	context int
}

// responseStore holds stored responses per resource, bounded.
type responseStore struct {
	mu sync.Mutex
	m  map[string]map[string]*storedResponse
}

const storedLimit = 100_000

func (rs *responseStore) get(res, id string) *storedResponse {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.m[res][id]
}

func (rs *responseStore) put(res, id string, sr *storedResponse) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.m == nil {
		rs.m = map[string]map[string]*storedResponse{}
	}
	if rs.m[res] == nil || len(rs.m[res]) >= storedLimit {
		rs.m[res] = map[string]*storedResponse{}
	}
	rs.m[res][id] = sr
}

func (rs *responseStore) delete(res, id string) bool {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	_, ok := rs.m[res][id]
	delete(rs.m[res], id)
	return ok
}

type responsesRequest struct {
	Model              string          `json:"model"`
	Input              json.RawMessage `json:"input"`
	Instructions       *string         `json:"instructions"`
	MaxOutputTokens    *int            `json:"max_output_tokens"`
	Stream             bool            `json:"stream"`
	Store              *bool           `json:"store"`
	PreviousResponseID *string         `json:"previous_response_id"`
	Metadata           map[string]any  `json:"metadata"`
}

// openAIError is the Responses API's error body.
func openAIError(w http.ResponseWriter, status int, typ, param, code, msg string) {
	e := map[string]any{"message": msg, "type": typ, "param": nil, "code": nil}
	if param != "" {
		e["param"] = param
	}
	if code != "" {
		e["code"] = code
	}
	writeJSON(w, status, map[string]any{"error": e})
}

// inputItems turns input into the items input_items lists.
func inputItems(raw json.RawMessage, id string) []map[string]any {
	var s string
	if readJSON(raw, &s) == nil {
		return []map[string]any{{"id": "msg_" + id + "_in0", "type": "message", "role": "user", "status": "completed",
			"content": []map[string]any{{"type": "input_text", "text": s}}}}
	}
	var items []map[string]any
	_ = readJSON(raw, &items)
	for i, it := range items {
		if _, ok := it["id"]; !ok {
			it["id"] = fmt.Sprintf("msg_%s_in%d", id, i)
		}
		if _, ok := it["type"]; !ok {
			it["type"] = "message"
		}
	}
	return items
}

// responsesPrompt counts input and instructions as chat messages.
func (d *deployment) responsesPrompt(req *responsesRequest) int {
	n := 3
	if req.Instructions != nil {
		n += 4 + d.count(*req.Instructions)
	}
	var s string
	if readJSON(req.Input, &s) == nil {
		return n + 4 + d.count(s)
	}
	var raws []json.RawMessage
	if readJSON(req.Input, &raws) != nil {
		return n + len(req.Input)/4
	}
	for _, raw := range raws {
		var it struct {
			Role    string          `json:"role"`
			Content json.RawMessage `json:"content"`
		}
		if readJSON(raw, &it) != nil || it.Role == "" {
			// A tool call, its output, a reference: its text, tokenized.
			n += 4 + d.count(string(raw))
			continue
		}
		n += 3 + d.count(it.Role) + d.contentTokens(it.Content)
	}
	return n
}

func (d *deployment) responsesLength(req *responsesRequest, maxTok int) int {
	h := sha256.New()
	h.Write(req.Input)
	if req.Instructions != nil {
		h.Write([]byte(*req.Instructions))
	}
	var sum [32]byte
	h.Sum(sum[:0])
	lo := max(d.CompletionTokens/2, 1)
	n := lo + int(binary.BigEndian.Uint32(sum[:4])%uint32(d.CompletionTokens+1))
	return max(min(n, maxTok), 0)
}

// responseObject is a Response as OpenAI shapes it; status in_progress
// (output empty, no usage) or finished.
func (d *deployment) responseObject(req *responsesRequest, id string, created int64, prompt, completion, maxTok int, done bool) map[string]any {
	var maxOut any
	if req.MaxOutputTokens != nil {
		maxOut = *req.MaxOutputTokens
	}
	store := req.Store == nil || *req.Store
	o := map[string]any{"id": "resp_" + id, "object": "response", "created_at": created, "status": "in_progress", "background": false,
		"error": nil, "incomplete_details": nil, "instructions": req.Instructions, "max_output_tokens": maxOut, "model": d.Model,
		"output": []any{}, "parallel_tool_calls": true, "previous_response_id": req.PreviousResponseID, "store": store,
		"temperature": 1.0, "text": map[string]any{"format": map[string]any{"type": "text"}}, "tool_choice": "auto", "tools": []any{},
		"top_p": 1.0, "truncation": "disabled", "usage": nil, "user": nil, "metadata": req.Metadata, "completed_at": nil}
	if o["metadata"] == nil {
		o["metadata"] = map[string]any{}
	}
	if !done {
		return o
	}
	o["status"] = "completed"
	if completion >= maxTok {
		o["status"] = "incomplete"
		o["incomplete_details"] = map[string]any{"reason": "max_output_tokens"}
	} else {
		o["completed_at"] = time.Now().Unix()
	}
	o["output"] = []any{outputMessage(id, content(completion), "completed")}
	o["usage"] = map[string]any{"input_tokens": prompt, "input_tokens_details": map[string]any{"cached_tokens": 0},
		"output_tokens": completion, "output_tokens_details": map[string]any{"reasoning_tokens": 0}, "total_tokens": prompt + completion}
	return o
}

func outputMessage(id, text, status string) map[string]any {
	parts := []any{}
	if status == "completed" {
		parts = append(parts, map[string]any{"type": "output_text", "text": text, "annotations": []any{}})
	}
	return map[string]any{"id": "msg_" + id, "type": "message", "status": status, "role": "assistant", "content": parts}
}

func (s *Server) storeResponse(r *http.Request, req *responsesRequest, o map[string]any, id string, prev *storedResponse, prompt, completion int) {
	if req.Store != nil && !*req.Store {
		return
	}
	ctx := prompt + completion
	if prev != nil {
		ctx = max(ctx, prev.context+completion)
	}
	s.stored.put(resourceOf(r), "resp_"+id, &storedResponse{obj: o, inputItems: inputItems(req.Input, id), context: ctx})
}

// respond answers an admitted Responses call, plain or streamed.
func (s *Server) respond(w http.ResponseWriter, r *http.Request, d *deployment, req *responsesRequest, prev *storedResponse, id string, prompt, maxTok int) {
	completion := d.responsesLength(req, maxTok)
	created := time.Now().Unix()
	if !req.Stream {
		if !sleep(r, d.draw(d.TTFT)+time.Duration(completion)*d.draw(d.PerToken)) {
			d.cancelled.Add(1)
			return
		}
		o := d.responseObject(req, id, created, prompt, completion, maxTok, true)
		s.storeResponse(r, req, o, id, prev, prompt, completion)
		writeJSON(w, 200, o)
		return
	}
	fl, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(200)
	seq := 0
	send := func(typ string, v map[string]any) bool {
		v["type"], v["sequence_number"] = typ, seq
		seq++
		b, _ := json.Marshal(v)
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", typ, b); err != nil {
			return false
		}
		if fl != nil {
			fl.Flush()
		}
		return true
	}
	msgID := "msg_" + id
	if !send("response.created", map[string]any{"response": d.responseObject(req, id, created, prompt, 0, maxTok, false)}) ||
		!send("response.in_progress", map[string]any{"response": d.responseObject(req, id, created, prompt, 0, maxTok, false)}) {
		return
	}
	if !sleep(r, d.draw(d.TTFT)) {
		d.cancelled.Add(1)
		return
	}
	if !send("response.output_item.added", map[string]any{"output_index": 0, "item": outputMessage(id, "", "in_progress")}) ||
		!send("response.content_part.added", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0,
			"part": map[string]any{"type": "output_text", "text": "", "annotations": []any{}}}) {
		return
	}
	for t := 0; t < completion; t++ {
		if !sleep(r, d.draw(d.PerToken)) {
			d.cancelled.Add(1)
			return
		}
		if !send("response.output_text.delta", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0,
			"delta": words[t%len(words)], "logprobs": []any{}}) {
			return
		}
	}
	text := content(completion)
	o := d.responseObject(req, id, created, prompt, completion, maxTok, true)
	s.storeResponse(r, req, o, id, prev, prompt, completion)
	terminal := "response.completed"
	if o["status"] == "incomplete" {
		terminal = "response.incomplete"
	}
	_ = send("response.output_text.done", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0, "text": text, "logprobs": []any{}}) &&
		send("response.content_part.done", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0,
			"part": map[string]any{"type": "output_text", "text": text, "annotations": []any{}}}) &&
		send("response.output_item.done", map[string]any{"output_index": 0, "item": outputMessage(id, text, "completed")}) &&
		send(terminal, map[string]any{"response": o})
}

// stored serves GET and DELETE of a stored response and its input items,
// on the resource that holds it only.
func (s *Server) storedResponse(w http.ResponseWriter, r *http.Request) {
	if !s.authorized(r) {
		azureError(w, 401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
		return
	}
	id, res := r.PathValue("id"), resourceOf(r)
	sr := s.stored.get(res, id)
	if sr == nil {
		openAIError(w, 404, "invalid_request_error", "", "", fmt.Sprintf("Response with id '%s' not found.", id))
		return
	}
	switch {
	case r.Method == http.MethodDelete:
		s.stored.delete(res, id)
		writeJSON(w, 200, map[string]any{"id": id, "object": "response.deleted", "deleted": true})
	case strings.HasSuffix(r.URL.Path, "/input_items"):
		items := sr.inputItems
		out := map[string]any{"object": "list", "data": items, "has_more": false, "first_id": nil, "last_id": nil}
		if len(items) > 0 {
			out["first_id"], out["last_id"] = items[0]["id"], items[len(items)-1]["id"]
		}
		writeJSON(w, 200, out)
	default:
		writeJSON(w, 200, sr.obj)
	}
}

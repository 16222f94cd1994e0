package broker

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/tiktoken-go/tokenizer"

	"github.com/levee-gw/levee/strictjson"
)

// Op is the kind of call, which decides how a body is estimated and which
// upstream path it goes to.
type Op int

const (
	OpChat Op = iota
	OpCompletions
	OpEmbeddings
	// OpResponses is the Responses API (/v1/responses).
	OpResponses
)

// Path is the operation's path suffix, shared by every dialect.
func (o Op) Path() string {
	switch o {
	case OpCompletions:
		return "completions"
	case OpEmbeddings:
		return "embeddings"
	case OpResponses:
		return "responses"
	default:
		return "chat/completions"
	}
}

func (o Op) String() string { return o.Path() }

// Group is the endpoint group a key may be scoped to: chat, completions,
// embeddings or responses.
func (o Op) Group() string {
	switch o {
	case OpCompletions:
		return "completions"
	case OpEmbeddings:
		return "embeddings"
	case OpResponses:
		return "responses"
	default:
		return "chat"
	}
}

// OpFromPath maps a path suffix (as after /v1/ or /deployments/{d}/) to an Op.
func OpFromPath(p string) (Op, bool) {
	switch p {
	case "chat/completions":
		return OpChat, true
	case "completions":
		return OpCompletions, true
	case "embeddings":
		return OpEmbeddings, true
	case "responses":
		return OpResponses, true
	}
	return 0, false
}

// Request is what Levee needs to know of a call's body: enough to route,
// police and charge it. The body itself is forwarded as the client sent it,
// which is why it is read with strictjson: the deployment must read the
// same fields Levee did.
type Request struct {
	Op    Op
	Model string
	// Stream is true for a server-sent-events call.
	Stream bool
	// IncludeUsage is whether the client itself asked for the usage chunk.
	IncludeUsage bool
	// MaxTokens is max_tokens or max_completion_tokens (0 when unset);
	// MaxTokensParam says which one the client used, for error messages.
	MaxTokens      int
	MaxTokensParam string
	N, BestOf      int
	// nullCeilings are max_tokens or max_completion_tokens sent as null
	// (present, but no ceiling).
	nullCeilings []string

	// Responses API: the stored response a call continues, whether the
	// response is to be stored upstream (nil: the default, true) and run
	// in the background.
	PreviousResponseID string
	Store              *bool
	Background         bool
	// ContextTokens are what a continued conversation carries from its
	// earlier turns: the deployment counts them as input.
	ContextTokens int

	// Parsed but not yet counted: counting needs the deployment's encoding.
	messages []message
	texts    []string // prompt or input strings
	rawToks  int      // token-id arrays counted as given
	extra    int      // characters of tools/functions definitions
}

// BadRequestError is a body Levee cannot accept; Param names the field.
// Code, when set, is a more specific error code than invalid_request.
type BadRequestError struct {
	Param string
	Msg   string
	Code  string
}

func (e *BadRequestError) Error() string { return e.Msg }

// message is a chat message as counted: its role, name and content, whose
// text parts are kept and other parts only counted.
type message struct {
	role, name string
	texts      []string
	images     int
	others     int // tokens of parts of other types
}

type wireMessage struct {
	Role    string          `json:"role"`
	Name    string          `json:"name"`
	Content json.RawMessage `json:"content"`
}

type contentPart struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

type wireRequest struct {
	Model               string          `json:"model"`
	Stream              bool            `json:"stream"`
	StreamOptions       *streamOptions  `json:"stream_options"`
	MaxTokens           json.RawMessage `json:"max_tokens"`
	MaxCompletionTokens json.RawMessage `json:"max_completion_tokens"`
	N                   *int            `json:"n"`
	BestOf              *int            `json:"best_of"`
	Messages            []wireMessage   `json:"messages"`
	Prompt              json.RawMessage `json:"prompt"`
	Input               json.RawMessage `json:"input"`
	Tools               json.RawMessage `json:"tools"`
	Functions           json.RawMessage `json:"functions"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

// MaxModelName bounds a model name: it is stored with the call's usage.
const MaxModelName = 256

// ParseRequest reads the fields Levee acts on. It rejects what upstream would
// reject anyway only where Levee must know the value to charge the call.
func ParseRequest(op Op, body []byte) (*Request, error) {
	if op == OpResponses {
		return parseResponses(body)
	}
	var w wireRequest
	if err := strictjson.Unmarshal(body, &w); err != nil {
		return nil, badJSON(err, "")
	}
	if len(w.Model) > MaxModelName || !strictjson.ValidText(w.Model) {
		return nil, &BadRequestError{Param: "model", Msg: fmt.Sprintf("model must be a name of at most %d characters, without control characters.", MaxModelName)}
	}
	r := &Request{Op: op, Model: w.Model, Stream: w.Stream, N: 1, BestOf: 1}
	if w.StreamOptions != nil {
		r.IncludeUsage = w.StreamOptions.IncludeUsage
	}
	// The ceilings are read raw: one sent as null is there (a ceiling
	// given to it later must replace it, not be a second key) but unset.
	var maxTokens, maxCompletion *int
	for _, f := range []struct {
		param string
		raw   json.RawMessage
		dst   **int
	}{{"max_tokens", w.MaxTokens, &maxTokens}, {"max_completion_tokens", w.MaxCompletionTokens, &maxCompletion}} {
		switch {
		case len(f.raw) == 0:
		case string(f.raw) == "null":
			r.nullCeilings = append(r.nullCeilings, f.param)
		default:
			var n int
			if err := strictjson.Unmarshal(f.raw, &n); err != nil {
				return nil, &BadRequestError{Param: f.param, Msg: f.param + " must be an integer."}
			}
			*f.dst = &n
		}
	}
	// Each limit the client sets must be a real one: 0 or less would be
	// charged as "no limit" here and refused (or worse) upstream.
	for _, f := range []struct {
		param string
		v     *int
	}{{"max_tokens", maxTokens}, {"max_completion_tokens", maxCompletion}, {"n", w.N}, {"best_of", w.BestOf}} {
		if f.v != nil && *f.v < 1 {
			return nil, &BadRequestError{Param: f.param, Msg: f.param + " must be at least 1."}
		}
	}
	if maxTokens != nil {
		r.MaxTokens, r.MaxTokensParam = *maxTokens, "max_tokens"
	}
	if maxCompletion != nil && *maxCompletion > r.MaxTokens {
		r.MaxTokens, r.MaxTokensParam = *maxCompletion, "max_completion_tokens"
	}
	if w.N != nil {
		r.N = *w.N
	}
	if w.BestOf != nil {
		r.BestOf = *w.BestOf
	}
	r.extra = len(w.Tools) + len(w.Functions)
	switch op {
	case OpChat:
		if len(w.Messages) == 0 {
			return nil, &BadRequestError{Param: "messages", Msg: "messages is required and must not be empty."}
		}
		r.messages = make([]message, len(w.Messages))
		for i, m := range w.Messages {
			if err := r.messages[i].parse(m, func() string { return fmt.Sprintf("messages[%d].content", i) }); err != nil {
				return nil, err
			}
		}
	case OpCompletions:
		if err := r.addTexts("prompt", w.Prompt); err != nil {
			return nil, err
		}
	case OpEmbeddings:
		if len(w.Input) == 0 {
			return nil, &BadRequestError{Param: "input", Msg: "input is required."}
		}
		if err := r.addTexts("input", w.Input); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// badJSON is a strictjson error as a BadRequestError, its param under prefix.
func badJSON(err error, prefix string) error {
	var se *strictjson.Error
	if !errors.As(err, &se) {
		return &BadRequestError{Param: prefix, Msg: err.Error()}
	}
	p := se.Param
	if prefix != "" {
		p = prefix
		if se.Param != "" {
			p += "." + se.Param
			if se.Param[0] == '[' {
				p = prefix + se.Param
			}
		}
	}
	return &BadRequestError{Param: p, Msg: se.Msg}
}

// parse reads a chat message's content: a string, null, or an array of
// content parts (strictly, like the body: a part's "TEXT" is refused).
// param names the content in an error; it is made only for one.
func (m *message) parse(w wireMessage, param func() string) error {
	m.role, m.name = w.Role, w.Name
	raw := bytes.TrimSpace(w.Content)
	switch {
	case len(raw) == 0 || string(raw) == "null":
	case raw[0] == '"':
		if len(raw) >= 2 && raw[len(raw)-1] == '"' && bytes.IndexByte(raw, '\\') < 0 {
			// The body passed strictjson: a string without escapes is its
			// bytes between the quotes, with nothing left to decode.
			m.texts = append(m.texts, string(raw[1:len(raw)-1]))
			break
		}
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			p := param()
			return &BadRequestError{Param: p, Msg: p + " must be a string or an array of content parts."}
		}
		m.texts = append(m.texts, s)
	case raw[0] == '[':
		var parts []contentPart
		if err := strictjson.Unmarshal(raw, &parts); err != nil {
			return badJSON(err, param())
		}
		// Each part's own bytes, to count what is not text by its size.
		var raws []json.RawMessage
		_ = json.Unmarshal(raw, &raws)
		for i, p := range parts {
			switch p.Type {
			case "text", "input_text", "output_text":
				m.texts = append(m.texts, p.Text)
			case "image_url", "input_image":
				m.images++
			default:
				// A file, audio, a refusal…: by size, as every byte of it
				// may reach the model.
				if i < len(raws) {
					m.others += len(raws[i])/4 + 1
				} else {
					m.others += len(p.Text)/4 + 1
				}
			}
		}
	default:
		p := param()
		return &BadRequestError{Param: p, Msg: p + " must be a string or an array of content parts."}
	}
	return nil
}

// addTexts accepts the four shapes OpenAI takes for prompt/input: a string, an
// array of strings, an array of token ids, or an array of such arrays.
func (r *Request) addTexts(param string, raw json.RawMessage) error {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	bad := &BadRequestError{Param: param, Msg: param + " must be a string, an array of strings, or an array of token arrays"}
	switch raw[0] {
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return bad
		}
		r.texts = append(r.texts, s)
		return nil
	case '[':
		var items []json.RawMessage
		if err := json.Unmarshal(raw, &items); err != nil {
			return bad
		}
		for _, it := range items {
			it = bytes.TrimSpace(it)
			switch {
			case len(it) == 0:
				return bad
			case it[0] == '"':
				var s string
				if err := json.Unmarshal(it, &s); err != nil {
					return bad
				}
				r.texts = append(r.texts, s)
			case it[0] == '[':
				var ids []int
				if err := json.Unmarshal(it, &ids); err != nil {
					return bad
				}
				r.rawToks += len(ids)
			default:
				r.rawToks++ // one token id of a flat id array
			}
		}
		return nil
	}
	return bad
}

// Tokenizers holds one codec per encoding; building one parses its whole
// vocabulary, so it is done once per process and shared. It also remembers
// the counts of system prompts, which repeat across calls by design.
type Tokenizers struct {
	mu     sync.Mutex
	codecs map[string]tokenizer.Codec

	cacheMu sync.RWMutex
	cache   map[cacheKey]int
}

type cacheKey struct {
	encoding string
	text     string
}

// Bounds of the system-prompt cache: entries, and the longest text kept.
const (
	cacheEntries = 4096
	cacheMaxText = 32 << 10
)

// NewTokenizers returns an empty set; codecs load on first use.
func NewTokenizers() *Tokenizers {
	return &Tokenizers{codecs: map[string]tokenizer.Codec{}, cache: map[cacheKey]int{}}
}

// countCached is Count for texts likely to repeat (system prompts).
func (t *Tokenizers) countCached(encoding, s string) int {
	if len(s) > cacheMaxText {
		return t.Count(encoding, s)
	}
	k := cacheKey{encoding, s}
	t.cacheMu.RLock()
	n, ok := t.cache[k]
	t.cacheMu.RUnlock()
	if ok {
		return n
	}
	n = t.Count(encoding, s)
	t.cacheMu.Lock()
	if len(t.cache) >= cacheEntries {
		clear(t.cache)
	}
	t.cache[k] = n
	t.cacheMu.Unlock()
	return n
}

// roleTokens: every standard role name is a single token in both encodings.
func (t *Tokenizers) roleTokens(encoding, role string) int {
	switch role {
	case "system", "user", "assistant", "tool", "developer", "function":
		return 1
	}
	return t.Count(encoding, role)
}

func (t *Tokenizers) codec(encoding string) (tokenizer.Codec, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if c, ok := t.codecs[encoding]; ok {
		return c, nil
	}
	c, err := tokenizer.Get(tokenizer.Encoding(encoding))
	if err != nil {
		return nil, fmt.Errorf("tokenizer %s: %w", encoding, err)
	}
	t.codecs[encoding] = c
	return c, nil
}

// Count returns the tokens of s under an encoding.
func (t *Tokenizers) Count(encoding, s string) int {
	if s == "" {
		return 0
	}
	c, err := t.codec(encoding)
	if err != nil {
		return len(s)/4 + 1
	}
	n, err := c.Count(s)
	if err != nil {
		return len(s)/4 + 1
	}
	return n
}

// Image parts are charged as a high-detail 512px image (85 base + 4 tiles ×
// 170): above a low-detail image, so estimates err on the safe side.
const imageTokens = 765

// PromptTokens counts a request's prompt the way OpenAI's cookbook does for
// chat (3 per message + fields, +1 for name, +3 priming), and plainly for
// prompts and inputs.
func (t *Tokenizers) PromptTokens(encoding string, r *Request) int {
	n := r.rawToks + r.ContextTokens
	for _, s := range r.texts {
		n += t.Count(encoding, s)
	}
	if r.Op == OpChat || r.Op == OpResponses {
		for _, m := range r.messages {
			count := t.Count
			if m.role == "system" || m.role == "developer" {
				count = t.countCached
			}
			n += 3 + t.roleTokens(encoding, m.role) + m.images*imageTokens + m.others
			for _, s := range m.texts {
				n += count(encoding, s)
			}
			if m.name != "" {
				n += 1 + t.Count(encoding, m.name)
			}
		}
		n += 3
	}
	// Tool schemas are counted by characters: close enough, and cheap.
	n += r.extra / 4
	return n
}

// maxEstimate caps an estimate: far above any deployment's TPM, and far
// from overflowing, so an absurd max_tokens is simply "too large" and can
// never wrap around to a negative charge that would free capacity.
const maxEstimate = 1 << 40

// Estimate is what a deployment charges on arrival (protocols.md §2): the
// prompt plus the completion budget times the number of completions.
func Estimate(prompt int, r *Request, defaultMaxTokens int) int {
	if r.Op == OpEmbeddings {
		return min(prompt, maxEstimate)
	}
	budget := r.MaxTokens
	if budget == 0 {
		budget = defaultMaxTokens
	}
	budget = min(budget, maxEstimate)
	copies := min(max(r.N, r.BestOf), maxEstimate)
	if budget > 0 && copies > maxEstimate/budget {
		return maxEstimate
	}
	return min(prompt+budget*copies, maxEstimate)
}

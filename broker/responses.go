package broker

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/levee-gw/levee/strictjson"
)

// The Responses API's body: input is a string or a list of items (messages
// with string or part content, and items of other types such as function
// call outputs), instructions a system message, max_output_tokens the
// ceiling. Read as strictly as a chat body, for the same reason: what Levee
// counts and charges must be what the deployment reads.
type wireResponses struct {
	Model              string          `json:"model"`
	Stream             bool            `json:"stream"`
	Background         bool            `json:"background"`
	Store              *bool           `json:"store"`
	PreviousResponseID *string         `json:"previous_response_id"`
	Instructions       *string         `json:"instructions"`
	Input              json.RawMessage `json:"input"`
	MaxOutputTokens    json.RawMessage `json:"max_output_tokens"`
	Tools              json.RawMessage `json:"tools"`
	// Read only to be counted: a structured output's schema and a stored
	// prompt's variables reach the model too.
	Text   json.RawMessage `json:"text"`
	Prompt json.RawMessage `json:"prompt"`
}

// inputItem is an item of input: a message has a role and content; other
// items (function_call, function_call_output, reasoning, item_reference…)
// are counted by their size.
type inputItem struct {
	Type    string          `json:"type"`
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// MaxResponseIDLen bounds a response id a client may name.
const MaxResponseIDLen = 128

// ValidResponseID reports whether id can be a response id: resp_ and
// base64url-ish characters. It keeps ids that reach a URL path plain.
func ValidResponseID(id string) bool {
	if len(id) < 6 || len(id) > MaxResponseIDLen || id[:5] != "resp_" {
		return false
	}
	for i := 5; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

func parseResponses(body []byte) (*Request, error) {
	var w wireResponses
	if err := strictjson.Unmarshal(body, &w); err != nil {
		return nil, badJSON(err, "")
	}
	if len(w.Model) > MaxModelName || !strictjson.ValidText(w.Model) {
		return nil, &BadRequestError{Param: "model", Msg: fmt.Sprintf("model must be a name of at most %d characters, without control characters.", MaxModelName)}
	}
	r := &Request{Op: OpResponses, Model: w.Model, Stream: w.Stream, Background: w.Background, Store: w.Store, N: 1, BestOf: 1}
	if w.PreviousResponseID != nil {
		if !ValidResponseID(*w.PreviousResponseID) {
			return nil, &BadRequestError{Param: "previous_response_id", Msg: "previous_response_id must be a response id (resp_…)."}
		}
		r.PreviousResponseID = *w.PreviousResponseID
	}
	switch raw := bytes.TrimSpace(w.MaxOutputTokens); {
	case len(raw) == 0:
	case string(raw) == "null":
		r.nullCeilings = append(r.nullCeilings, "max_output_tokens")
	default:
		var n int
		if err := strictjson.Unmarshal(raw, &n); err != nil {
			return nil, &BadRequestError{Param: "max_output_tokens", Msg: "max_output_tokens must be an integer."}
		}
		// OpenAI's own floor: below it reasoning models cannot answer.
		if n < 16 {
			return nil, &BadRequestError{Param: "max_output_tokens", Msg: "max_output_tokens must be at least 16."}
		}
		r.MaxTokens, r.MaxTokensParam = n, "max_output_tokens"
	}
	if w.Instructions != nil && *w.Instructions != "" {
		r.messages = append(r.messages, message{role: "system", texts: []string{*w.Instructions}})
	}
	r.extra = len(w.Tools) + len(w.Text) + len(w.Prompt)
	if w.Background && w.Store != nil && !*w.Store {
		return nil, &BadRequestError{Param: "store", Msg: "A background response must be stored: leave store unset or true."}
	}
	in := bytes.TrimSpace(w.Input)
	switch {
	case len(in) == 0 || string(in) == "null":
		if r.PreviousResponseID == "" {
			return nil, &BadRequestError{Param: "input", Msg: "input is required."}
		}
	case in[0] == '"':
		var s string
		if err := json.Unmarshal(in, &s); err != nil {
			return nil, &BadRequestError{Param: "input", Msg: "input must be a string or an array of input items."}
		}
		r.messages = append(r.messages, message{role: "user", texts: []string{s}})
	case in[0] == '[':
		var items []json.RawMessage
		if err := strictjson.Unmarshal(in, &items); err != nil {
			return nil, badJSON(err, "input")
		}
		for i, raw := range items {
			var it inputItem
			param := fmt.Sprintf("input[%d]", i)
			if err := strictjson.Unmarshal(raw, &it); err != nil {
				return nil, badJSON(err, param)
			}
			if it.Role == "" || (it.Type != "" && it.Type != "message") {
				// Not a message: a tool call, its output, a reference…
				// its JSON text counted as text, which is at least what
				// the model reads of it.
				r.messages = append(r.messages, message{role: "tool", texts: []string{string(raw)}})
				continue
			}
			var m message
			if err := m.parse(wireMessage{Role: it.Role, Content: it.Content}, func() string { return param + ".content" }); err != nil {
				return nil, err
			}
			r.messages = append(r.messages, m)
		}
	default:
		return nil, &BadRequestError{Param: "input", Msg: "input must be a string or an array of input items."}
	}
	return r, nil
}

// responseUsage is the usage a Responses API body or event reports, as
// Usage: input as prompt, output as completion.
type responseUsage struct {
	InputTokens  int `json:"input_tokens"`
	OutputTokens int `json:"output_tokens"`
	InputDetails *struct {
		CachedTokens int `json:"cached_tokens"`
	} `json:"input_tokens_details"`
}

// ResponseID reads a Response object's id, and whether the deployment
// stores it (store, default true). An object that is not a response has
// no id.
func ResponseID(body []byte) (id string, stored bool) {
	var r struct {
		ID     string `json:"id"`
		Object string `json:"object"`
		Store  *bool  `json:"store"`
	}
	if json.Unmarshal(body, &r) != nil || r.Object != "response" || !ValidResponseID(r.ID) {
		return "", false
	}
	return r.ID, r.Store == nil || *r.Store
}

// ResponseEventID reads the response of a Responses stream event (its
// "response" member), as ResponseID does.
func ResponseEventID(data []byte) (id string, stored bool) {
	var e struct {
		Response json.RawMessage `json:"response"`
	}
	if json.Unmarshal(data, &e) != nil || len(e.Response) == 0 {
		return "", false
	}
	return ResponseID(e.Response)
}

// ResponseStatus reads a Response object's status ("" if it is not one).
func ResponseStatus(body []byte) string {
	var r struct {
		Object string `json:"object"`
		Status string `json:"status"`
	}
	if json.Unmarshal(body, &r) != nil || r.Object != "response" {
		return ""
	}
	return r.Status
}

// WithResponseFields sets top-level members of a body the gateway already
// validated (strictly: one object, no duplicate names), and drops those set
// to nil: what goes upstream differs from what the client sent only there.
func WithResponseFields(body []byte, set map[string]any) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, &BadRequestError{Msg: "invalid JSON body"}
	}
	for k, v := range set {
		if v == nil {
			delete(m, k)
			continue
		}
		raw, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		m[k] = raw
	}
	return json.Marshal(m)
}

// ReadEvents reads a server-sent-event stream and calls fn with the data of
// each event, until the stream ends (nil) or breaks (its error).
func ReadEvents(r io.Reader, fn func(data []byte) error) error {
	br := bufio.NewReaderSize(r, 32<<10)
	var data []byte
	have := false
	for {
		line, err := br.ReadBytes('\n')
		trimmed := bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) > 0 && len(trimmed) == 0:
			if have {
				if ferr := fn(data); ferr != nil {
					return ferr
				}
				data, have = data[:0], false
			}
		case bytes.HasPrefix(trimmed, []byte("data:")):
			v := bytes.TrimPrefix(trimmed[len("data:"):], []byte(" "))
			if have {
				data = append(data, '\n')
			}
			data, have = append(data, v...), true
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				if have {
					return fn(data)
				}
				return nil
			}
			return err
		}
	}
}

// RewriteEvent renumbers a Responses stream event (its sequence_number plus
// offset) and, when it carries the response, sets fields of it (its id as
// the caller knows it, say).
// It returns the event's type and number, the event as rewritten, and the
// response it carried as the deployment sent it (nil if none).
func RewriteEvent(data []byte, offset int, fields map[string]any) (typ string, seq int, out, response []byte, err error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		return "", 0, nil, nil, err
	}
	_ = json.Unmarshal(m["type"], &typ)
	_ = json.Unmarshal(m["sequence_number"], &seq)
	seq += offset
	m["sequence_number"] = json.RawMessage(strconv.Itoa(seq))
	if raw, ok := m["response"]; ok && len(raw) > 0 && raw[0] == '{' {
		response = raw
		fixed, err := WithResponseFields(raw, fields)
		if err != nil {
			return "", 0, nil, nil, err
		}
		m["response"] = fixed
	}
	out, err = json.Marshal(m)
	return typ, seq, out, response, err
}

// TerminalEvent reports whether a Responses stream event type ends the
// stream.
func TerminalEvent(typ string) bool {
	return typ == "response.completed" || typ == "response.incomplete" || typ == "response.failed"
}

// ResponseUsage reads the usage of a Response object, or of the response a
// stream event carries, from its own usage member: not by searching the
// text, since metadata (echoed from the request) may hold a "usage" key.
func ResponseUsage(body []byte) (Usage, bool) {
	// Most stream events (every delta) carry no usage: they are passed
	// over without being decoded. The key is only a necessary sign; the
	// decode below decides.
	if !bytes.Contains(body, []byte(`"usage"`)) {
		return Usage{}, false
	}
	var r struct {
		Usage    json.RawMessage `json:"usage"`
		Response *struct {
			Usage json.RawMessage `json:"usage"`
		} `json:"response"`
	}
	if json.Unmarshal(body, &r) != nil {
		return Usage{}, false
	}
	raw := r.Usage
	if r.Response != nil {
		raw = r.Response.Usage
	}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return Usage{}, false
	}
	return ParseUsage(append([]byte(`{"usage":`), append(raw, '}')...))
}

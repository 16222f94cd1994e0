package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/levee-gw/levee/config"
)

// Client is the only code that speaks HTTP to a deployment. It builds each
// upstream request from scratch, so nothing of the caller's credentials can
// leak through, and adds the deployment's own.
type Client struct {
	hc *http.Client
}

// NewClient returns a client with a connection pool sized for a busy gateway.
func NewClient() *Client {
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          4096,
		MaxIdleConnsPerHost:   1024,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		// Bodies are relayed byte for byte; never re-encode them.
		DisableCompression: true,
	}
	return &Client{hc: &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}}
}

// ErrTimeout is returned when a deployment sends no response headers within
// its configured timeout.
var ErrTimeout = errors.New("deployment did not answer in time")

// forwarded are the caller's headers worth passing on; everything else
// (api-key, Authorization, cookies, hop-by-hop) is dropped by construction.
var forwarded = []string{"Accept", "User-Agent", "X-Ms-Client-Request-Id"}

// URL is where a call of op goes on deployment d.
func URL(d *config.Deployment, op Op) string {
	if d.API == config.OpenAI {
		return d.Endpoint + "/v1/" + op.Path()
	}
	return d.Endpoint + "/openai/deployments/" + d.UpstreamName + "/" + op.Path() + "?api-version=" + d.APIVersion
}

// Do sends body to deployment d. The returned response's body must be closed;
// closing it also frees the call's context.
func (c *Client) Do(ctx context.Context, d *config.Deployment, op Op, body []byte, from http.Header) (*http.Response, error) {
	if d.API == config.OpenAI {
		var err error
		if body, err = setModel(body, d.UpstreamName); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, URL(d, op), bytes.NewReader(body))
	if err != nil {
		cancel(nil)
		return nil, fmt.Errorf("deployment %s: %w", d.Name, err)
	}
	for _, k := range forwarded {
		if v := from.Get(k); v != "" {
			req.Header.Set(k, v)
		}
	}
	req.Header.Set("Content-Type", "application/json")
	if d.API == config.OpenAI {
		req.Header.Set("Authorization", "Bearer "+d.Credential)
	} else {
		req.Header.Set("api-key", d.Credential)
	}
	timer := time.AfterFunc(d.Timeout, func() { cancel(ErrTimeout) })
	resp, err := c.hc.Do(req)
	stopped := timer.Stop()
	if err != nil {
		cause := context.Cause(ctx)
		cancel(nil)
		if !stopped && errors.Is(cause, ErrTimeout) {
			return nil, fmt.Errorf("deployment %s: %w", d.Name, ErrTimeout)
		}
		// The URL carries no secret, but say only the deployment's name.
		var ue interface{ Unwrap() error }
		if errors.As(err, &ue) {
			err = ue.Unwrap()
		}
		return nil, fmt.Errorf("deployment %s: %w", d.Name, err)
	}
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: func() { cancel(nil) }}
	return resp, nil
}

type cancelOnClose struct {
	io.ReadCloser
	cancel func()
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

// setModel rewrites the body's model for OpenAI-style deployments, whose
// model name upstream need not be the alias the client used.
func setModel(body []byte, model string) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, &BadRequestError{Msg: "invalid JSON body"}
	}
	name, _ := json.Marshal(model)
	if bytes.Equal(m["model"], name) {
		return body, nil
	}
	m["model"] = name
	return json.Marshal(m)
}

// Usage is a response's token accounting.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

var usageKey = []byte(`"usage":`)

// ParseUsage reads the usage object of a response body or stream chunk. The
// object is found by its key, searching from the end where it usually is,
// and only it is decoded. Inside a JSON string the key could only appear
// with its quotes escaped, so a raw match is always a real key.
func ParseUsage(body []byte) (Usage, bool) {
	var u Usage
	i := bytes.LastIndex(body, usageKey)
	if i < 0 {
		return u, false
	}
	rest := bytes.TrimLeft(body[i+len(usageKey):], " \t\r\n")
	if len(rest) == 0 || rest[0] != '{' {
		return u, false // "usage": null
	}
	if err := json.NewDecoder(bytes.NewReader(rest)).Decode(&u); err != nil {
		return u, false
	}
	if u.TotalTokens == 0 {
		u.TotalTokens = u.PromptTokens + u.CompletionTokens
	}
	return u, true
}

// WithStreamUsage asks upstream for the final usage chunk. It returns the
// body unchanged when the client already asked.
func WithStreamUsage(body []byte, r *Request) ([]byte, error) {
	if !r.Stream || r.IncludeUsage || r.Op == OpEmbeddings {
		return body, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, &BadRequestError{Msg: "invalid JSON body"}
	}
	var so map[string]json.RawMessage
	if raw, ok := m["stream_options"]; ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &so); err != nil {
			return nil, &BadRequestError{Param: "stream_options", Msg: "stream_options must be an object"}
		}
	}
	if so == nil {
		so = map[string]json.RawMessage{}
	}
	so["include_usage"] = json.RawMessage("true")
	m["stream_options"], _ = json.Marshal(so)
	return json.Marshal(m)
}

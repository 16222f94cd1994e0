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
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/levee-gw/levee/config"
)

// Client is the only code that speaks HTTP to a deployment. It builds each
// upstream request from scratch, so nothing of the caller's credentials can
// leak through, and adds the deployment's own.
//
// It has two paths. Do uses net/http and streams the response, and the
// caller's context cancels the call. Buffered uses fasthttp, whose client
// writes the request and reads the response on the calling goroutine: with
// no hand-offs between goroutines it adds about 90 µs less per call than
// net/http's transport on a 2-core machine at 1,000 calls/s (see README,
// "Added latency"), which is most of the latency budget of a gateway. Its
// price is that only a deadline, not a context, can stop a call already sent.
type Client struct {
	hc   *http.Client
	fast *fasthttp.Client
	// direct caches, per endpoint, whether the environment configures no
	// HTTP proxy for it: the fast path speaks only directly.
	direct sync.Map
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
	fast := &fasthttp.Client{
		NoDefaultUserAgentHeader: true,
		DisablePathNormalizing:   true,
		// LLM calls last seconds, so a busy deployment can have thousands in
		// flight; like net/http's transport, do not let a local pool limit
		// queue them (or fail them and blame the deployment).
		MaxConnsPerHost:     1 << 16,
		MaxConnWaitTimeout:  5 * time.Second,
		MaxIdleConnDuration: 30 * time.Second,
		MaxResponseBodySize: MaxResponseBody,
		DialTimeout: func(addr string, timeout time.Duration) (net.Conn, error) {
			return fasthttp.DialTimeout(addr, min(timeout, 5*time.Second))
		},
		// A POST is not retried, except when a kept-alive connection turns
		// out to have been closed before any byte of the answer: net/http
		// retries that case too, and it would otherwise count against a
		// healthy deployment.
		RetryIfErr: func(_ *fasthttp.Request, attempts int, err error) (bool, bool) {
			// io.EOF here is "no byte of a response" (fasthttp reports it
			// as ErrConnectionClosed once it gives up).
			return false, attempts == 1 && (errors.Is(err, io.EOF) || errors.Is(err, fasthttp.ErrConnectionClosed))
		},
	}
	return &Client{fast: fast, hc: &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}}
}

// MaxResponseBody bounds a buffered response held in memory.
const MaxResponseBody = 64 << 20

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
	if op == OpResponses {
		// Azure serves the Responses API only on its v1 surface, the
		// deployment named by the body's model.
		return d.Endpoint + "/openai/v1/responses"
	}
	return d.Endpoint + "/openai/deployments/" + d.UpstreamName + "/" + op.Path() + "?api-version=" + d.APIVersion
}

// upstream is the one place that decides what a deployment receives: the
// body (with the upstream model name for OpenAI-style deployments), the
// caller's forwarded headers and the deployment's own credential, set with
// set. Both client paths build their requests through it.
func upstream(d *config.Deployment, op Op, body []byte, from http.Header, set func(k, v string)) ([]byte, error) {
	if d.API == config.OpenAI || op == OpResponses {
		var err error
		if body, err = setModel(body, d.UpstreamName); err != nil {
			return nil, err
		}
	}
	set("Content-Type", "application/json")
	credentials(d, from, set)
	return body, nil
}

// credentials sets the caller's forwarded headers and the deployment's own
// credential: the only headers of a caller's that reach a deployment.
func credentials(d *config.Deployment, from http.Header, set func(k, v string)) {
	for _, k := range forwarded {
		if v := from.Get(k); v != "" {
			set(k, v)
		}
	}
	// The W3C trace context passes on: the caller's own when Levee does
	// not trace, the attempt's when it does (see Broker.traceAttempt). Only
	// a well-formed one, and a tracestate of W3C's recommended size.
	if v := from.Get("Traceparent"); validTraceparent(v) {
		set("Traceparent", v)
		if ts := from.Get("Tracestate"); ts != "" && len(ts) <= 512 {
			set("Tracestate", ts)
		}
	}
	if d.API == config.OpenAI {
		set("Authorization", "Bearer "+d.Credential)
	} else {
		set("api-key", d.Credential)
	}
}

// validTraceparent checks the shape of a W3C traceparent:
// version-traceid-parentid-flags in lowercase hex, neither id all zeros.
func validTraceparent(v string) bool {
	if len(v) != 55 || v[2] != '-' || v[35] != '-' || v[52] != '-' || v[:2] == "ff" {
		return false
	}
	zeroTrace, zeroParent := true, true
	for i := 0; i < len(v); i++ {
		if i == 2 || i == 35 || i == 52 {
			continue
		}
		c := v[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
		if c != '0' {
			if i > 2 && i < 35 {
				zeroTrace = false
			} else if i > 35 && i < 52 {
				zeroParent = false
			}
		}
	}
	return !zeroTrace && !zeroParent
}

// Do sends body to deployment d. The returned response's body must be closed;
// closing it also frees the call's context.
func (c *Client) Do(ctx context.Context, d *config.Deployment, op Op, body []byte, from http.Header) (*http.Response, error) {
	h := make(http.Header, len(forwarded)+2)
	body, err := upstream(d, op, body, from, h.Set)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, URL(d, op), bytes.NewReader(body))
	if err != nil {
		cancel(nil)
		return nil, fmt.Errorf("deployment %s: %w", d.Name, err)
	}
	req.Header = h
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

// Buffered sends body to deployment d like Do, but reads the whole response
// before returning, on the calling goroutine. The context is honoured before
// the call and through its deadline; cancelling it cannot abort a call
// already sent, so use Do when that matters (streams, queue workers). The
// returned response's body must be closed.
func (c *Client) Buffered(ctx context.Context, d *config.Deployment, op Op, body []byte, from http.Header) (*http.Response, error) {
	if !c.isDirect(d) {
		return c.Do(ctx, d, op, body, from)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	req := fasthttp.AcquireRequest()
	defer fasthttp.ReleaseRequest(req)
	body, err := upstream(d, op, body, from, req.Header.Set)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(d.Timeout)
	ctxDeadline := false
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline, ctxDeadline = dl, true
	}
	req.SetRequestURI(URL(d, op))
	req.Header.SetMethod(http.MethodPost)
	req.SetBodyRaw(body)
	resp := fasthttp.AcquireResponse()
	if err := c.fast.DoDeadline(req, resp, deadline); err != nil {
		fasthttp.ReleaseResponse(resp)
		if cerr := ctx.Err(); cerr != nil {
			return nil, cerr
		}
		if errors.Is(err, fasthttp.ErrTimeout) {
			if ctxDeadline {
				// fasthttp can notice the deadline a moment before ctx does.
				return nil, context.DeadlineExceeded
			}
			return nil, fmt.Errorf("deployment %s: %w", d.Name, ErrTimeout)
		}
		return nil, fmt.Errorf("deployment %s: %w", d.Name, err)
	}
	h := copyHeader(&resp.Header)
	b := resp.Body()
	return &http.Response{
		Status:        strconv.Itoa(resp.StatusCode()) + " " + http.StatusText(resp.StatusCode()),
		StatusCode:    resp.StatusCode(),
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		ContentLength: int64(len(b)),
		Body:          &pooledBody{Reader: bytes.NewReader(b), buf: b, resp: resp},
	}, nil
}

// knownHeaders are the names of headers deployments usually send, in
// canonical form: copying a response's headers takes its name from here
// rather than allocating it for every header of every call.
var knownHeaders = func() map[string]string {
	m := map[string]string{}
	for _, k := range []string{"Content-Type", "Content-Length", "Date", "Server", "Connection", "X-Request-Id", "Apim-Request-Id",
		"X-Ms-Region", "X-Ms-Client-Request-Id", "X-Ms-Deployment-Name", "X-Ms-Rai-Invoked", "X-Content-Type-Options",
		"Strict-Transport-Security", "Azureml-Model-Session", "Ms-Azureml-Model-Time", "Cmp-Upstream-Response-Duration",
		"Openai-Organization", "Openai-Processing-Ms", "Openai-Version", "Openai-Project", "Retry-After", "Retry-After-Ms",
		"X-Ratelimit-Limit-Tokens", "X-Ratelimit-Limit-Requests", "X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Remaining-Requests",
		"X-Ratelimit-Reset-Tokens", "X-Ratelimit-Reset-Requests", "Cache-Control", "Cf-Ray", "Set-Cookie"} {
		m[k] = k
	}
	return m
}()

// copyHeader makes a fasthttp response's headers an http.Header, every
// value kept, with one allocation per value and one for all their slices.
func copyHeader(rh *fasthttp.ResponseHeader) http.Header {
	n := rh.Len()
	h := make(http.Header, n)
	vals := make([]string, 0, n)
	for k, v := range rh.All() {
		key, ok := knownHeaders[string(k)]
		if !ok {
			key = http.CanonicalHeaderKey(string(k))
		}
		if prev, ok := h[key]; ok {
			h[key] = append(prev, string(v))
			continue
		}
		vals = append(vals, string(v))
		h[key] = vals[len(vals)-1 : len(vals) : len(vals)]
	}
	return h
}

// isDirect reports whether d's endpoint is reached without an HTTP proxy.
func (c *Client) isDirect(d *config.Deployment) bool {
	if v, ok := c.direct.Load(d.Endpoint); ok {
		return v.(bool)
	}
	u, err := url.Parse(d.Endpoint)
	direct := false
	if err == nil {
		p, perr := http.ProxyFromEnvironment(&http.Request{URL: u})
		direct = perr == nil && p == nil
	}
	c.direct.Store(d.Endpoint, direct)
	return direct
}

// pooledBody reads a fasthttp response's body and returns the response to
// its pool when closed.
type pooledBody struct {
	*bytes.Reader
	buf  []byte
	once sync.Once
	resp *fasthttp.Response
}

// ReadBody reads a response's whole body, at most MaxResponseBody bytes. A
// buffered response's body is in memory already and is returned as it is,
// not copied: it is valid until the body is closed.
func ReadBody(resp *http.Response) ([]byte, error) {
	if b, ok := resp.Body.(*pooledBody); ok {
		rest := b.buf[len(b.buf)-b.Len():]
		_, _ = b.Seek(0, io.SeekEnd)
		return rest, nil
	}
	return io.ReadAll(io.LimitReader(resp.Body, MaxResponseBody))
}

func (b *pooledBody) Close() error {
	b.once.Do(func() { fasthttp.ReleaseResponse(b.resp) })
	return nil
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
	// Details carry the prompt tokens served from the deployment's cache
	// (priced lower).
	Details *struct {
		CachedTokens int `json:"cached_tokens"`
	} `json:"prompt_tokens_details,omitempty"`
}

// CachedTokens is how many prompt tokens came from the cache.
func (u *Usage) CachedTokens() int {
	if u.Details == nil {
		return 0
	}
	return min(u.Details.CachedTokens, u.PromptTokens)
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
	// One decode reads both shapes: chat's prompt/completion and the
	// Responses API's input/output.
	var both struct {
		Usage
		responseUsage
	}
	// Only the object is decoded: a json.Decoder over the rest would
	// allocate its own buffer on every call.
	end := objectEnd(rest)
	if end < 0 {
		return u, false
	}
	if err := json.Unmarshal(rest[:end], &both); err != nil {
		return u, false
	}
	u = both.Usage
	if r := both.responseUsage; u.PromptTokens == 0 && u.CompletionTokens == 0 && (r.InputTokens > 0 || r.OutputTokens > 0) {
		u.PromptTokens, u.CompletionTokens = r.InputTokens, r.OutputTokens
		if r.InputDetails != nil && r.InputDetails.CachedTokens > 0 {
			u.Details = &struct {
				CachedTokens int `json:"cached_tokens"`
			}{r.InputDetails.CachedTokens}
		}
	}
	if u.TotalTokens == 0 {
		u.TotalTokens = u.PromptTokens + u.CompletionTokens
	}
	return u, true
}

// objectEnd is the length of the JSON object b starts with, or -1 when it
// does not end within b. Brackets inside strings are skipped; whether the
// object is valid JSON is left to the decoder.
func objectEnd(b []byte) int {
	depth, inString := 0, false
	for i := 0; i < len(b); i++ {
		c := b[i]
		if inString {
			switch c {
			case '\\':
				i++
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '{', '[':
			depth++
		case '}', ']':
			if depth--; depth == 0 {
				return i + 1
			}
		}
	}
	return -1
}

// WithDefaultMaxTokens gives a call that sets no ceiling on what it
// generates the one it is charged for (p.DefaultMaxTokens), so the
// deployment cannot generate more than Levee charged on admission — and
// checked against the caller's limits and budget. The body was parsed
// strictly (one top-level object, no duplicate keys, and this key absent),
// so the member is inserted after its opening brace without re-encoding.
func WithDefaultMaxTokens(body []byte, r *Request, p config.Model) []byte {
	if r.MaxTokensParam != "" || p.DefaultMaxTokens <= 0 || r.Op == OpEmbeddings {
		return body
	}
	param := "max_tokens"
	if r.Op == OpResponses {
		if p.MaxTokensParam == "none" {
			return body
		}
		param = "max_output_tokens"
	}
	if r.Op == OpChat {
		switch p.MaxTokensParam {
		case "none":
			return body
		case "", "max_completion_tokens":
			param = "max_completion_tokens"
		}
	}
	if len(r.nullCeilings) > 0 {
		// A ceiling sent as null is no ceiling: dropped, so the body does
		// not carry two (or the same key twice), re-encoding this rare one.
		var m map[string]json.RawMessage
		if json.Unmarshal(body, &m) != nil {
			return body
		}
		for _, k := range r.nullCeilings {
			delete(m, k)
		}
		m[param] = json.RawMessage(strconv.Itoa(p.DefaultMaxTokens))
		out, err := json.Marshal(m)
		if err != nil {
			return body
		}
		return out
	}
	i := bytes.IndexByte(body, '{')
	if i < 0 {
		return body
	}
	member := `"` + param + `":` + strconv.Itoa(p.DefaultMaxTokens)
	rest := bytes.TrimLeft(body[i+1:], " \t\r\n")
	if len(rest) > 0 && rest[0] != '}' {
		member += ","
	}
	out := make([]byte, 0, len(body)+len(member))
	out = append(out, body[:i+1]...)
	out = append(out, member...)
	return append(out, body[i+1:]...)
}

// WithStreamUsage asks upstream for the final usage chunk. It returns the
// body unchanged when the client already asked.
func WithStreamUsage(body []byte, r *Request) ([]byte, error) {
	// A Responses stream always ends with its usage (response.completed).
	if !r.Stream || r.IncludeUsage || r.Op == OpEmbeddings || r.Op == OpResponses {
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

// Forward sends a bodiless request (a GET or DELETE of a stored resource,
// such as a response) to path under deployment d's API root, with the
// deployment's credential and the caller's forwarded headers only. The
// returned response's body must be closed.
func (c *Client) Forward(ctx context.Context, d *config.Deployment, method, path, rawQuery string, from http.Header) (*http.Response, error) {
	base := d.Endpoint + "/openai/v1/"
	if d.API == config.OpenAI {
		base = d.Endpoint + "/v1/"
	}
	u := base + path
	if rawQuery != "" {
		u += "?" + rawQuery
	}
	ctx, cancel := context.WithTimeout(ctx, d.Timeout)
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("deployment %s: %w", d.Name, err)
	}
	credentials(d, from, req.Header.Set)
	resp, err := c.hc.Do(req)
	if err != nil {
		cancel()
		var ue interface{ Unwrap() error }
		if errors.As(err, &ue) {
			err = ue.Unwrap()
		}
		return nil, fmt.Errorf("deployment %s: %w", d.Name, err)
	}
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

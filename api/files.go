package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/batch"
	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
)

// Bounds of what an upload may carry into Postgres.
const (
	maxFilename = 255
	maxCustomID = 512
)

// inputLine is one line of a batch input file.
type inputLine struct {
	CustomID *string         `json:"custom_id"`
	Method   string          `json:"method"`
	URL      string          `json:"url"`
	Body     json.RawMessage `json:"body"`
}

type lineProblems struct {
	list  []string
	count int
}

func (p *lineProblems) add(line int, code, msg string) {
	p.count++
	if len(p.list) < 20 {
		p.list = append(p.list, fmt.Sprintf("line %d: %s (%s)", line, msg, code))
	}
}

// uploadFile is POST /v1/files: multipart with `file` and `purpose=batch`.
// The upload is received whole first — validated line by line as it
// arrives and spooled to a temporary file — and only then written to
// Postgres in one transaction. A client that sends slowly or stops holds a
// goroutine and a file, never a database connection; a bad upload (a bad
// line, a second file part, a wrong purpose) stores nothing.
func (s *Server) uploadFile(c echo.Context) error {
	key := keyOf(c)
	r := c.Request()
	if r.ContentLength > maxFileBytes+(1<<20) {
		return fileTooLarge()
	}
	release, err := s.uploads.take(key.TenantID)
	if err != nil {
		return err
	}
	defer release()
	r.Body = http.MaxBytesReader(c.Response(), r.Body, maxFileBytes+(1<<20))
	mr, err := r.MultipartReader()
	if err != nil {
		return invalid("file", "invalid_request", "Upload the file as multipart/form-data with fields file and purpose.")
	}
	var (
		purpose string
		up      *upload
		// OpenAI's expires_after, as its SDKs send it in a form.
		anchor, seconds string
		seen            = map[string]bool{}
	)
	defer func() {
		if up != nil {
			up.close()
		}
	}()
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return uploadError(err)
		}
		name := part.FormName()
		switch name {
		case "purpose", "expires_after[anchor]", "expires_after[seconds]":
			// A field given twice would leave which one counts to the
			// reader: refused, like a duplicate JSON member.
			if seen[name] {
				return invalid(name, "invalid_request", "The field %s is given more than once.", name)
			}
			seen[name] = true
			b, err := io.ReadAll(io.LimitReader(part, maxFieldBytes+1))
			if err != nil {
				return uploadError(err)
			}
			// Longer is refused, not cut: the first 64 bytes of a longer
			// value ("7200", spaces, more) may read as a valid one.
			if len(b) > maxFieldBytes {
				return invalid(name, "invalid_request", "The field %s is longer than %d bytes.", name, maxFieldBytes)
			}
			v := strings.TrimSpace(string(b))
			switch name {
			case "purpose":
				purpose = v
			case "expires_after[anchor]":
				anchor = v
			default:
				seconds = v
			}
		case "file":
			if up != nil {
				return invalid("file", "invalid_request", "Send one file per upload.")
			}
			if up, err = receive(part, s.uploads.dir); err != nil {
				return err
			}
		default:
			if _, err := io.Copy(io.Discard, part); err != nil {
				return uploadError(err)
			}
		}
		part.Close()
	}
	// Whatever follows the closing boundary is read too, so the connection
	// can serve the client's next request.
	_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, 64<<10))
	if up == nil {
		return invalid("file", "invalid_request", "The file field is required.")
	}
	if purpose != "batch" {
		return invalid("purpose", "invalid_request", "purpose must be batch; got %q.", strictjson.Clip(purpose))
	}
	expiresAfter, err := s.fileExpiry(anchor, seconds)
	if err != nil {
		return err
	}
	// Copying into Postgres is bounded like any other wait on it, plus a
	// second per MiB of file.
	ctx, cancel := s.dbContext(r.Context())
	defer cancel()
	ctx, cancelCopy := context.WithTimeout(ctx, s.cfg.DatabaseTimeout+time.Duration(up.bytes>>20)*time.Second)
	defer cancelCopy()
	f, err := up.store(ctx, s.batches, key.TenantID, expiresAfter)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, s.renderFile(f))
}

// maxFieldBytes bounds an upload's form fields other than the file.
const maxFieldBytes = 64

// fileExpiry reads OpenAI's expires_after: anchor created_at and 3600 to
// 2592000 seconds. Without it an upload takes retention.uploads (OpenAI's
// default for batch files is 30 days); 0 is never.
func (s *Server) fileExpiry(anchor, seconds string) (time.Duration, error) {
	if anchor == "" && seconds == "" {
		return max(s.cfg.Retention.Uploads, 0), nil
	}
	if anchor != "created_at" {
		return 0, invalid("expires_after[anchor]", "invalid_request", "expires_after[anchor] must be created_at; got %q.", strictjson.Clip(anchor))
	}
	n, err := strconv.ParseInt(seconds, 10, 64)
	if err != nil || n < 3600 || n > 2592000 {
		return 0, invalid("expires_after[seconds]", "invalid_request", "expires_after[seconds] must be a whole number from 3600 to 2592000; got %q.", strictjson.Clip(seconds))
	}
	return time.Duration(n) * time.Second, nil
}

func fileTooLarge() *Error {
	return &Error{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error", Param: "file", Code: "file_too_large",
		Message: fmt.Sprintf("A batch input file may be at most %d bytes.", maxFileBytes)}
}

func uploadError(err error) error {
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return fileTooLarge()
	case errors.Is(err, errBodyTooSlow):
		return bodyTooSlow()
	}
	return invalid("file", "invalid_request", "Could not read the upload: the multipart body is malformed or was cut off.")
}

// upload is a received, validated file, its lines spooled to disk.
type upload struct {
	name  string
	url   string
	bytes int64
	spool *os.File
	w     *bufio.Writer
}

func (u *upload) close() {
	u.spool.Close()
	os.Remove(u.spool.Name())
}

// receive reads a file part to its end, validating each line as it comes:
// JSON read strictly, a unique custom_id of bounded size, method POST, one
// supported url for every line, a body that is an object, and OpenAI's
// bounds on lines and bytes. Problems are reported by line number.
func receive(part *multipart.Part, dir string) (_ *upload, err error) {
	name := part.FileName()
	if name == "" {
		name = "upload.jsonl"
	}
	if len(name) > maxFilename || !strictjson.ValidText(name) {
		return nil, invalid("file", "invalid_request", "The file name must be at most %d bytes of text, without control characters.", maxFilename)
	}
	spool, err := os.CreateTemp(dir, "upload-*.spool")
	if err != nil {
		return nil, fmt.Errorf("api: spool upload: %w", err)
	}
	u := &upload{name: name, spool: spool, w: bufio.NewWriterSize(spool, 256<<10)}
	defer func() {
		if err != nil {
			u.close()
		}
	}()
	sc := bufio.NewScanner(part)
	sc.Buffer(make([]byte, 64<<10), maxLineBytes)
	var (
		problems lineProblems
		seen     = map[string]int{}
		n, line  int
		rec      []byte
	)
	for sc.Scan() {
		line++
		raw := sc.Bytes()
		u.bytes += int64(len(raw)) + 1
		if len(bytes.TrimSpace(raw)) == 0 {
			continue
		}
		n++
		if n > maxFileLines {
			problems.add(line, "too_many_tasks", fmt.Sprintf("a batch may have at most %d requests", maxFileLines))
			break
		}
		var l inputLine
		if err := strictjson.Unmarshal(raw, &l); err != nil {
			msg := "not valid JSON"
			var se *strictjson.Error
			if errors.As(err, &se) && se.Param != "" {
				msg = se.Msg
			}
			problems.add(line, "invalid_json_line", msg)
			continue
		}
		switch {
		case l.CustomID == nil || *l.CustomID == "":
			problems.add(line, "invalid_request", "custom_id is required")
			continue
		case len(*l.CustomID) > maxCustomID || !strictjson.ValidText(*l.CustomID):
			problems.add(line, "invalid_request", fmt.Sprintf("custom_id must be at most %d bytes of text, without control characters", maxCustomID))
			continue
		case seen[*l.CustomID] > 0:
			problems.add(line, "duplicate_custom_id", fmt.Sprintf("custom_id %q was already used on line %d", strictjson.Clip(*l.CustomID), seen[*l.CustomID]))
			continue
		case l.Method != "POST":
			problems.add(line, "invalid_request", "method must be POST")
			continue
		case len(bytes.TrimSpace(l.Body)) == 0 || bytes.TrimSpace(l.Body)[0] != '{':
			problems.add(line, "invalid_request", "body must be a JSON object")
			continue
		}
		if _, _, ok := batch.Endpoint(l.URL); !ok {
			problems.add(line, "invalid_request", fmt.Sprintf("url %q is not a supported endpoint", strictjson.Clip(l.URL)))
			continue
		}
		if u.url == "" {
			u.url = l.URL
		} else if l.URL != u.url {
			problems.add(line, "url_mismatch", fmt.Sprintf("every line must use the same url (%s), not %s", u.url, strictjson.Clip(l.URL)))
			continue
		}
		// The body's model, read as strictly as the body will be, is kept
		// beside it: the batch's jobs are made from these two.
		var bm struct {
			Model string `json:"model"`
		}
		if err := strictjson.Unmarshal(l.Body, &bm); err != nil {
			problems.add(line, "invalid_request", "body: "+err.Error())
			continue
		}
		if len(bm.Model) > broker.MaxModelName || !strictjson.ValidText(bm.Model) {
			problems.add(line, "invalid_request", fmt.Sprintf("body.model must be a name of at most %d characters", broker.MaxModelName))
			continue
		}
		seen[*l.CustomID] = line
		if problems.count == 0 {
			// The body is spooled as where it sits in the line: its bytes
			// as the client sent them.
			at := bytes.Index(raw, l.Body)
			if at < 0 { // cannot be: the body is a slice of the line as read
				return nil, fmt.Errorf("api: line %d: its body is not where it was read", line)
			}
			rec = binary.AppendUvarint(rec[:0], uint64(line))
			rec = appendChunk(rec, []byte(*l.CustomID))
			rec = appendChunk(rec, []byte(bm.Model))
			rec = binary.AppendUvarint(rec, uint64(at))
			rec = binary.AppendUvarint(rec, uint64(len(l.Body)))
			rec = binary.AppendUvarint(rec, uint64(len(raw)))
			if _, err := u.w.Write(rec); err != nil {
				return nil, fmt.Errorf("api: spool upload: %w", err)
			}
			if _, err := u.w.Write(raw); err != nil {
				return nil, fmt.Errorf("api: spool upload: %w", err)
			}
		}
	}
	if err := sc.Err(); err != nil {
		if !errors.Is(err, bufio.ErrTooLong) {
			return nil, uploadError(err)
		}
		problems.add(line+1, "invalid_request", fmt.Sprintf("a line may be at most %d bytes", maxLineBytes))
	}
	if n == 0 && problems.count == 0 {
		problems.add(1, "empty_file", "the file has no requests")
	}
	if problems.count > 0 {
		more := ""
		if problems.count > len(problems.list) {
			more = fmt.Sprintf("; and %d more", problems.count-len(problems.list))
		}
		return nil, invalid("file", "invalid_file", "The batch input file has %d problem(s): %s%s.", problems.count, strings.Join(problems.list, "; "), more)
	}
	if err := u.w.Flush(); err != nil {
		return nil, fmt.Errorf("api: spool upload: %w", err)
	}
	return u, nil
}

// store writes the spooled lines to Postgres.
func (u *upload) store(ctx context.Context, st *store.Store, tenant uuid.UUID, expiresAfter time.Duration) (*store.File, error) {
	if _, err := u.spool.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("api: spool upload: %w", err)
	}
	br := bufio.NewReaderSize(u.spool, 256<<10)
	next := func() (*store.FileLine, error) {
		line, err := binary.ReadUvarint(br)
		if err != nil {
			return nil, err // io.EOF at the end
		}
		cid, err := readChunk(br)
		if err != nil {
			return nil, err
		}
		model, err := readChunk(br)
		if err != nil {
			return nil, err
		}
		at, err1 := binary.ReadUvarint(br)
		n, err2 := binary.ReadUvarint(br)
		if err1 != nil || err2 != nil {
			return nil, io.ErrUnexpectedEOF
		}
		raw, err := readChunk(br)
		if err != nil || at+n > uint64(len(raw)) {
			return nil, io.ErrUnexpectedEOF
		}
		return &store.FileLine{Line: int(line), CustomID: string(cid), Raw: raw, BodyAt: int(at), BodyLen: int(n), Model: string(model)}, nil
	}
	return st.ImportFile(ctx, &store.ImportFileParams{TenantID: tenant, Filename: u.name, Purpose: "batch", URL: u.url, Bytes: u.bytes, Next: next, ExpiresAfter: expiresAfter})
}

func appendChunk(rec, b []byte) []byte {
	return append(binary.AppendUvarint(rec, uint64(len(b))), b...)
}

func readChunk(br *bufio.Reader) ([]byte, error) {
	n, err := binary.ReadUvarint(br)
	if err != nil {
		return nil, io.ErrUnexpectedEOF
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(br, b); err != nil {
		return nil, io.ErrUnexpectedEOF
	}
	return b, nil
}

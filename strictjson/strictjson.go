// Package strictjson decodes JSON that came from a client the way the
// upstream APIs read it, so that what Levee validates, charges and forwards
// is the same thing. Go's encoding/json matches member names
// case-insensitively and lets a repeated name silently win, so
// {"max_tokens":100000,"MAX_TOKENS":5} would be read as 5 by Levee and as
// 100000 by the deployment. Here member names match exactly, a name may
// appear only once in any object of the body, strings must be valid UTF-8,
// and a member that differs from a field Levee reads only in case (or in
// '_' and '-') is refused instead of guessed at.
package strictjson

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	json "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

// Error is a body that cannot be accepted. Param is the offending member in
// OpenAI's param style (messages[0].content), empty for the body as a whole.
type Error struct {
	Param string
	Msg   string
}

func (e *Error) Error() string { return e.Msg }

// Unmarshal decodes data into v (a pointer to a struct, slice or map whose
// fields carry json tags).
func Unmarshal(data []byte, v any) error {
	if err := json.Unmarshal(data, v); err != nil {
		return describe(err)
	}
	w := walkers.Get().(*walker)
	defer walkers.Put(w)
	w.r.Reset(data)
	// Unmarshal has refused duplicate names already: the walk need not track them.
	w.dec.Reset(&w.r, jsontext.AllowDuplicateNames(true))
	if err := checkNames(&w.dec, reflect.TypeOf(v), ""); err != nil {
		var e *Error
		if errors.As(err, &e) {
			return e
		}
		return describe(err)
	}
	return nil
}

// describe turns a decoding error into an Error naming the member.
func describe(err error) *Error {
	var se *json.SemanticError
	var ye *jsontext.SyntacticError
	switch {
	case errors.As(err, &ye) && errors.Is(ye.Err, jsontext.ErrDuplicateName):
		p := Clip(Param(ye.JSONPointer))
		return &Error{Param: p, Msg: fmt.Sprintf("%s appears more than once in its object; send each field once.", quote(p))}
	case errors.As(err, &ye):
		return &Error{Msg: fmt.Sprintf("We could not parse the JSON body of your request: %v.", ye.Err)}
	case errors.As(err, &se):
		p := Clip(Param(se.JSONPointer))
		what := "a JSON " + se.JSONKind.String()
		if se.JSONKind == 0 {
			what = "this value"
		}
		want := "the expected type"
		if se.GoType != nil {
			want = typeName(se.GoType)
		}
		if p == "" {
			return &Error{Msg: fmt.Sprintf("The request body must be %s, not %s.", want, what)}
		}
		return &Error{Param: p, Msg: fmt.Sprintf("%s must be %s, not %s.", p, want, what)}
	}
	return &Error{Msg: fmt.Sprintf("We could not parse the JSON body of your request: %v.", err)}
}

// Clip shortens a client's string before it is echoed in a message or a
// param: at most 64 bytes, cut at a character boundary, marked with "…".
func Clip(s string) string {
	const max = 64
	if len(s) <= max {
		return s
	}
	i := max
	for i > max-4 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "…"
}

func quote(p string) string {
	if p == "" {
		return "A member"
	}
	return p
}

func typeName(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Map, reflect.Struct:
		return "an object"
	}
	return "the expected type"
}

// Param renders a JSON pointer (/messages/0/content) as OpenAI names a
// param (messages[0].content).
func Param(p jsontext.Pointer) string {
	var b strings.Builder
	for tok := range p.Tokens() {
		if _, err := strconv.ParseUint(tok, 10, 63); err == nil && b.Len() > 0 {
			b.WriteString("[" + tok + "]")
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('.')
		}
		b.WriteString(tok)
	}
	return b.String()
}

// fields is what Levee reads of one struct type: its members by exact name,
// and by folded name to catch variants.
type fields struct {
	exact  map[string]reflect.Type
	folded map[string]string
	// longest is the longest folded name: anything longer is no variant.
	longest int
}

var fieldCache sync.Map // reflect.Type → *fields

func fieldsOf(t reflect.Type) *fields {
	if f, ok := fieldCache.Load(t); ok {
		return f.(*fields)
	}
	f := &fields{exact: map[string]reflect.Type{}, folded: map[string]string{}}
	for i := range t.NumField() {
		sf := t.Field(i)
		if !sf.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(sf.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = sf.Name
		}
		f.exact[name] = sf.Type
		k := fold(name, nil)
		f.folded[string(k)] = name
		f.longest = max(f.longest, len(k))
	}
	fieldCache.Store(t, f)
	return f
}

// variant returns the field name is a variant of, if any.
func (f *fields) variant(name []byte) (string, bool) {
	var buf [64]byte
	k := fold(name, buf[:0])
	if len(k) > f.longest {
		return "", false
	}
	canon, ok := f.folded[string(k)]
	return canon, ok
}

// fold is as loose as any reader upstream might be: '_' and '-' ignored (as
// encoding/json/v2's case-insensitive mode does), ASCII lowered, and any
// other letter mapped through upper and lower case and its case-folding
// orbit (so the Kelvin sign reads as k, the long s as s, and the dotted and
// dotless i as i). It appends to buf.
func fold[T string | []byte](name T, buf []byte) []byte {
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c >= utf8.RuneSelf {
			return foldSlow(string(name), buf[:0])
		}
		switch {
		case c == '_' || c == '-':
		case 'A' <= c && c <= 'Z':
			buf = append(buf, c+'a'-'A')
		default:
			buf = append(buf, c)
		}
	}
	return buf
}

func foldSlow(name string, buf []byte) []byte {
	for _, r := range name {
		if r == '_' || r == '-' {
			continue
		}
		r = unicode.ToLower(unicode.ToUpper(r))
		// The smallest rune of r's folding orbit stands for all of it.
		least := r
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			least = min(least, f)
		}
		if least < utf8.RuneSelf {
			least = unicode.ToLower(least)
		}
		buf = utf8.AppendRune(buf, least)
	}
	return buf
}

var rawType = reflect.TypeFor[jsontext.Value]()

// A walker's decoder keeps its buffers between bodies.
type walker struct {
	r   bytes.Reader
	dec jsontext.Decoder
}

var walkers = sync.Pool{New: func() any { return new(walker) }}

// readName reads a member name. The common name has no escapes, and is then
// used in place, without a copy.
func readName(dec *jsontext.Decoder) ([]byte, error) {
	v, err := dec.ReadValue()
	if err != nil {
		return nil, err
	}
	if bytes.IndexByte(v, '\\') < 0 {
		return v[1 : len(v)-1], nil
	}
	var s string
	if err := json.Unmarshal(v, &s); err != nil {
		return nil, err
	}
	return []byte(s), nil
}

// checkNames walks the body alongside the type it was decoded into and
// refuses any member that is not one of a struct's names but folds to one.
// Members Levee does not read are skipped whole.
func checkNames(dec *jsontext.Decoder, t reflect.Type, path string) error {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	kind := dec.PeekKind()
	switch {
	case t == nil || t == rawType:
	case kind == '{' && t.Kind() == reflect.Struct:
		f := fieldsOf(t)
		if _, err := dec.ReadToken(); err != nil {
			return err
		}
		for dec.PeekKind() != '}' {
			name, err := readName(dec)
			if err != nil {
				return err
			}
			if ft, ok := f.exact[string(name)]; ok {
				if err := checkNames(dec, ft, join(path, string(name))); err != nil {
					return err
				}
				continue
			}
			if canon, ok := f.variant(name); ok {
				p := Clip(join(path, string(name)))
				return &Error{Param: p, Msg: fmt.Sprintf("%s is not a parameter: names are case-sensitive, and a variant of %s is refused rather than guessed at.",
					p, join(path, canon))}
			}
			if err := dec.SkipValue(); err != nil {
				return err
			}
		}
		_, err := dec.ReadToken()
		return err
	case kind == '{' && t.Kind() == reflect.Map:
		if _, err := dec.ReadToken(); err != nil {
			return err
		}
		for dec.PeekKind() != '}' {
			tok, err := dec.ReadToken()
			if err != nil {
				return err
			}
			if err := checkNames(dec, t.Elem(), join(path, tok.String())); err != nil {
				return err
			}
		}
		_, err := dec.ReadToken()
		return err
	case kind == '[' && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array) && t.Elem().Kind() != reflect.Uint8:
		if _, err := dec.ReadToken(); err != nil {
			return err
		}
		for i := 0; dec.PeekKind() != ']'; i++ {
			if err := checkNames(dec, t.Elem(), path+"["+strconv.Itoa(i)+"]"); err != nil {
				return err
			}
		}
		_, err := dec.ReadToken()
		return err
	}
	return dec.SkipValue()
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

// ValidText reports whether s can be stored as Postgres text and shown
// back: valid UTF-8 without NUL or other C0 control characters (tab, line
// feed and carriage return aside).
func ValidText(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 && c != '\t' && c != '\n' && c != '\r' {
			return false
		}
	}
	return true
}

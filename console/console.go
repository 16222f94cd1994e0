// Package console is the operator's console: a small app of plain
// JavaScript modules, HTML and CSS, embedded in the binary, that runs in the
// browser and does everything through the admin API (/admin/v1) with the
// admin key the operator signs in with. Its files hold no data and need no
// authentication; every call they make carries the key.
//
// Everything a page shows that came from the API — tenant and key names,
// metadata, job bodies, error messages — is put in the page as text (DOM
// nodes and textContent, never markup), and the files are served with a
// Content-Security-Policy that allows scripts, styles and connections to this
// origin only and no inline script, so a value that slipped past that rule
// still could not run.
package console

import (
	"bytes"
	"embed"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"time"
)

//go:embed static
var files embed.FS

// CSP is the Content-Security-Policy of every console file: this origin's
// scripts, styles, images and API only; no inline script or style
// element, no plugins, no <base>, no form posts, no framing.
const CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'self'; " +
	"object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Handler serves the console's files; mount it with the mount point
// stripped, so that "/" is the app (index.html). Unknown names are 404.
func Handler() http.Handler {
	static, err := fs.Sub(files, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", CSP)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		// A new binary's files are fetched again, not taken from a cache.
		h.Set("Cache-Control", "no-cache")
		name := strings.TrimPrefix(path.Clean("/"+r.URL.Path), "/")
		if name == "" {
			name = "index.html"
		}
		b, err := fs.ReadFile(static, name)
		if err != nil {
			// Directories too: the app's folders are not listed.
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(b))
	})
}

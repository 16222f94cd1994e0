package config

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"
)

// NATSTLS is how Levee connects to NATS over TLS. Any field set turns TLS
// on. The files are checked at load and read again by the client at each
// (re)connect, so renewed certificates are picked up without a restart.
type NATSTLS struct {
	// CAFile holds the CA certificates the servers' certificates must chain
	// to (default: the system's roots).
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are Levee's client certificate, for servers that
	// verify clients (mutual TLS).
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ServerName is the name the servers' certificates must carry when it
	// is not the host in nats_url (servers reached by IP address).
	ServerName string `yaml:"server_name"`
}

// Enabled reports whether any TLS setting is given.
func (t NATSTLS) Enabled() bool { return t != NATSTLS{} }

// natsSchemes are the URL schemes the NATS client connects with.
var natsSchemes = []string{"nats", "tls", "ws", "wss"}

// NATSServers splits nats_url into its servers' URLs, as the NATS client
// does.
func NATSServers(natsURL string) []string {
	var out []string
	for _, s := range strings.Split(natsURL, ",") {
		if s = strings.TrimSuffix(strings.TrimSpace(s), "/"); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// parseNATSURL parses one server's URL; like the NATS client, it takes
// host:port without a scheme as nats://host:port.
func parseNATSURL(s string) (*url.URL, error) {
	if !strings.Contains(s, "://") {
		s = "nats://" + s
	}
	return url.Parse(s)
}

// RedactNATSURL is nats_url fit to print or log: each server's password
// becomes xxxxx, and so does a token (a user name without a password is
// one). A server that does not parse is shown as (unparsable), since its
// text might hold a secret.
func RedactNATSURL(natsURL string) string {
	servers := NATSServers(natsURL)
	for i, s := range servers {
		u, err := parseNATSURL(s)
		if err != nil {
			servers[i] = "(unparsable)"
			continue
		}
		if u.User != nil {
			if _, ok := u.User.Password(); ok {
				u.User = url.UserPassword(u.User.Username(), "xxxxx")
			} else {
				u.User = url.User("xxxxx")
			}
		}
		servers[i] = u.String()
	}
	return strings.Join(servers, ",")
}

// validateNATS checks nats_url, nats_creds, nats_tls and queue.domain.
// Errors never quote nats_url: it may carry a password.
func (c *Config) validateNATS() error {
	if c.NATSURL == "" {
		switch {
		case c.NATSCreds != "":
			return &FieldError{"nats_creds", "set without nats_url"}
		case c.NATSTLS.Enabled():
			return &FieldError{"nats_tls", "set without nats_url"}
		case c.Queue.Domain != "":
			return &FieldError{"queue.domain", "set without nats_url"}
		}
		return nil
	}
	servers := NATSServers(c.NATSURL)
	if len(servers) == 0 {
		return &FieldError{"nats_url", "names no server"}
	}
	for i, s := range servers {
		u, err := parseNATSURL(s)
		if err != nil || u.Host == "" || u.Path != "" || !slices.Contains(natsSchemes, u.Scheme) {
			return &FieldError{"nats_url", fmt.Sprintf("server %d of %d is not a URL such as nats://[user:password@]host:4222 (schemes: %s)",
				i+1, len(servers), strings.Join(natsSchemes, ", "))}
		}
	}
	if c.NATSCreds != "" {
		if _, err := os.ReadFile(c.NATSCreds); err != nil {
			return &FieldError{"nats_creds", err.Error()}
		}
	}
	if err := c.NATSTLS.validate(); err != nil {
		return err
	}
	if strings.ContainsAny(c.Queue.Domain, ".*> \t") {
		return &FieldError{"queue.domain", "must be one subject token: no dots, wildcards or spaces"}
	}
	return nil
}

func (t *NATSTLS) validate() error {
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return &FieldError{"nats_tls.ca_file", err.Error()}
		}
		if !x509.NewCertPool().AppendCertsFromPEM(pem) {
			return &FieldError{"nats_tls.ca_file", t.CAFile + " holds no PEM certificate"}
		}
	}
	if (t.CertFile == "") != (t.KeyFile == "") {
		return &FieldError{"nats_tls.cert_file", "cert_file and key_file go together"}
	}
	if t.CertFile != "" {
		if _, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile); err != nil {
			return &FieldError{"nats_tls.cert_file", err.Error()}
		}
	}
	return nil
}

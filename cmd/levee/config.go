package main

import (
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"text/tabwriter"

	"github.com/levee-gw/levee/config"
)

// cmdConfig is `levee config check FILE`: the file is loaded and validated
// exactly as `levee serve` would (environment included: credentials are
// read from their variables), and what it would serve is printed.
func cmdConfig(args []string, out io.Writer, getenv func(string) string) error {
	if len(args) != 2 || args[0] != "check" {
		return errors.New("usage: levee config check FILE")
	}
	c, err := config.Load(args[1], getenv)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "%s is valid. It would serve:\n\n", args[1])
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEPLOYMENT\tMODEL\tKIND\tTPM\tRPM\tPRIORITY\tAPI\tENDPOINT")
	for _, d := range c.Deployments {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s\n", d.Name, d.Model, d.Kind, d.TPM, d.RPM, d.Priority, d.API, hostOf(d.Endpoint))
	}
	fmt.Fprintln(tw, "\t\t\t\t\t\t\t")
	fmt.Fprintln(tw, "MODEL ALIAS\tDEPLOYMENTS\tMAX TOKENS\tDEFAULT MAX TOKENS\t\t\t\t")
	for _, m := range c.Models {
		maxTokens := "none"
		if m.MaxTokens > 0 {
			maxTokens = fmt.Sprint(m.MaxTokens)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t\t\t\t\n", m.Name, strings.Join(m.Deployments, ", "), maxTokens, m.DefaultMaxTokens)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(out, "\nprices: %d entries in %s", len(c.Pricing.Prices), c.Pricing.Currency)
	fmt.Fprintf(out, "; token issuers: %d", len(c.Auth.OIDC.Issuers))
	for _, is := range c.Auth.OIDC.Issuers {
		fmt.Fprintf(out, "\n  %s (audiences %s; tenant from %s; %d grants)", is.Issuer, strings.Join(is.Audiences, ", "), is.TenantClaim, len(is.Grants))
	}
	fmt.Fprintf(out, "\nqueue: %s; workers in levee serve: %v\n", queueOf(c), c.Worker.Enabled)
	return nil
}

// hostOf shows where a deployment is without anything secret a URL might
// carry (user info, query).
func hostOf(endpoint string) string {
	u, err := url.Parse(endpoint)
	if err != nil {
		return "(unparsable)"
	}
	return u.Scheme + "://" + u.Host + u.Path
}

// queueOf says where the queue is, with any password or token in nats_url
// replaced by xxxxx (hostOf would not do: nats_url may list several URLs).
func queueOf(c *config.Config) string {
	if c.NATSURL == "" {
		return "off (no nats_url)"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "NATS at %s", config.RedactNATSURL(c.NATSURL))
	if c.NATSCreds != "" {
		fmt.Fprintf(&b, ", credentials from %s", c.NATSCreds)
	}
	if c.NATSTLS.Enabled() {
		b.WriteString(", TLS")
		if c.NATSTLS.CertFile != "" {
			b.WriteString(" with a client certificate")
		}
	}
	if c.Queue.Domain != "" {
		fmt.Fprintf(&b, ", JetStream domain %s", c.Queue.Domain)
	}
	fmt.Fprintf(&b, ", %d replicas", c.Queue.Replicas)
	return b.String()
}

package webhook

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"sync"
	"syscall"
	"time"
)

// Guard decides which addresses deliveries may reach: only globally
// routable unicast, unless an option opens more. The zero value is the
// strict guard; NewGuard adds a cache of this host's own addresses.
type Guard struct {
	// AllowLoopback lets deliveries reach 127.0.0.0/8, ::1 and this
	// host's own addresses (levee dev, a receiver on this machine).
	AllowLoopback bool
	// AllowPrivate also lets them reach private (RFC 1918, ULA, CGNAT),
	// link-local and cloud metadata addresses (a receiver inside your own
	// network).
	AllowPrivate bool

	// host caches this machine's addresses; nil reads them on every check.
	host *hostAddrs
}

// NewGuard returns a guard that reads this host's addresses at most every
// hostAddrsTTL, shared by all copies of it.
func NewGuard(allowLoopback, allowPrivate bool) Guard {
	return Guard{AllowLoopback: allowLoopback, AllowPrivate: allowPrivate, host: &hostAddrs{read: interfaceAddrs}}
}

// ErrBlocked is returned for a target the guard refuses. The wrapping error
// says which address and rule.
var ErrBlocked = errors.New("webhook target is not public (a loopback, private, link-local or metadata address, or another special-purpose address)")

// class is how far an address is from the public internet. Each class is
// opened by a subset of the options that open the one before it.
type class uint8

const (
	global   class = iota // always allowed
	loopback              // AllowLoopback or AllowPrivate
	private               // AllowPrivate
	never                 // no option opens it
)

type rule struct {
	prefix netip.Prefix
	class  class
	reason string
}

// rules follow the IANA IPv4 and IPv6 Special-Purpose Address Registries
// (RFC 6890 and updates), plus multicast, IPv4-compatible and site-local
// IPv6. The longest matching prefix decides, so globally reachable entries
// carve holes in the ranges around them. IPv4-mapped, NAT64 (64:ff9b::/96),
// 6to4 and Teredo addresses never get here: their IPv4 addresses are judged
// instead.
var rules = func() []rule {
	rs := []rule{
		{p("0.0.0.0/0"), global, "a public address"},
		{p("0.0.0.0/8"), never, `a "this network" address`},
		{p("0.0.0.0/32"), never, "the unspecified address"},
		{p("10.0.0.0/8"), private, "a private address"},
		{p("100.64.0.0/10"), private, "a shared (CGNAT) address"},
		{p("127.0.0.0/8"), loopback, "a loopback address"},
		{p("169.254.0.0/16"), private, "a link-local address"},
		{p("169.254.169.254/32"), private, "a cloud metadata address"},
		{p("172.16.0.0/12"), private, "a private address"},
		{p("192.0.0.0/24"), never, "an IETF protocol assignment"},
		{p("192.0.0.0/29"), never, "an IPv4 service continuity (DS-Lite) address"},
		{p("192.0.0.8/32"), never, "the IPv4 dummy address"},
		{p("192.0.0.9/32"), global, "the PCP anycast address"},
		{p("192.0.0.10/32"), global, "the TURN anycast address"},
		{p("192.0.0.170/32"), never, "a NAT64/DNS64 discovery address"},
		{p("192.0.0.171/32"), never, "a NAT64/DNS64 discovery address"},
		{p("192.0.2.0/24"), never, "a documentation address"},
		{p("192.88.99.0/24"), never, "a deprecated 6to4 relay anycast address"},
		{p("192.168.0.0/16"), private, "a private address"},
		{p("198.18.0.0/15"), never, "a benchmarking address"},
		{p("198.51.100.0/24"), never, "a documentation address"},
		{p("203.0.113.0/24"), never, "a documentation address"},
		{p("224.0.0.0/4"), never, "a multicast address"},
		{p("240.0.0.0/4"), never, "a reserved address"},
		{p("255.255.255.255/32"), never, "the broadcast address"},

		{p("::/0"), never, "outside IPv6 global unicast (2000::/3)"},
		{p("::/96"), never, "a deprecated IPv4-compatible address"},
		{p("::/128"), never, "the unspecified address"},
		{p("::1/128"), loopback, "a loopback address"},
		{p("64:ff9b:1::/48"), never, "a local-use IPv4/IPv6 translation address"},
		{p("100::/64"), never, "a discard-only address"},
		{p("100:0:0:1::/64"), never, "a dummy address"},
		{p("2000::/3"), global, "a public address"},
		{p("2001::/23"), never, "an IETF protocol assignment"},
		{p("2001:1::1/128"), global, "the PCP anycast address"},
		{p("2001:1::2/128"), global, "the TURN anycast address"},
		{p("2001:1::3/128"), global, "the DNS-SD SRP anycast address"},
		{p("2001:2::/48"), never, "a benchmarking address"},
		{p("2001:3::/32"), global, "an AMT address"},
		{p("2001:4:112::/48"), global, "an AS112 address"},
		{p("2001:10::/28"), never, "a deprecated ORCHID address"},
		{p("2001:20::/28"), global, "an ORCHIDv2 address"},
		{p("2001:30::/28"), global, "a drone remote ID address"},
		{p("2001:db8::/32"), never, "a documentation address"},
		{p("3fff::/20"), never, "a documentation address"},
		{p("5f00::/16"), never, "a segment routing SID"},
		{p("fc00::/7"), private, "a unique local address"},
		{p("fd00:ec2::254/128"), private, "a cloud metadata address"},
		{p("fe80::/10"), private, "a link-local address"},
		{p("fec0::/10"), never, "a deprecated site-local address"},
		{p("ff00::/8"), never, "a multicast address"},
	}
	// Longest prefix first, so the first match is the most specific.
	slices.SortStableFunc(rs, func(a, b rule) int { return b.prefix.Bits() - a.prefix.Bits() })
	return rs
}()

func p(s string) netip.Prefix { return netip.MustParsePrefix(s) }

var (
	nat64  = p("64:ff9b::/96")
	sixTo4 = p("2002::/16")
	teredo = p("2001::/32")
)

// Allowed reports whether deliveries may reach ip.
func (g Guard) Allowed(ip netip.Addr) bool {
	return g.refusal(ip) == ""
}

// refusal says why g refuses ip, or "" if it allows it.
func (g Guard) refusal(ip netip.Addr) string {
	c, why := g.classify(ip)
	switch {
	case c == global, c == loopback && (g.AllowLoopback || g.AllowPrivate), c == private && g.AllowPrivate:
		return ""
	}
	return why
}

// classify places ip in its class, naming the rule that put it there.
func (g Guard) classify(ip netip.Addr) (class, string) {
	// Prefixes never contain zoned addresses; the zone does not change where
	// a link-local address leads.
	ip = ip.Unmap().WithZone("")
	if !ip.IsValid() {
		return never, "not an IP address"
	}
	c, why := never, ""
	if inner, kind := embedded(ip); kind != "" {
		// Anything an embedded IPv4 address could lead to, the wrapper could
		// too: it is as open as the strictest address inside.
		c = global
		for _, v4 := range inner {
			if ic, iwhy := g.classify(v4); ic >= c {
				c, why = ic, fmt.Sprintf("%s for %s, %s", kind, v4, iwhy)
			}
		}
	} else {
		for _, r := range rules {
			if r.prefix.Contains(ip) {
				c, why = r.class, r.reason
				break
			}
		}
	}
	if c == never {
		return c, why
	}
	// A receiver listening on 0.0.0.0 answers on every address of this host
	// just as it does on loopback.
	self, err := g.host.contains(ip)
	switch {
	case err != nil:
		return never, fmt.Sprintf("not checkable against this host's own addresses (%v)", err)
	case self && c != loopback:
		return loopback, "this host's own address"
	}
	return c, why
}

// embedded returns the IPv4 addresses inside an IPv6 address that carries
// them, and what kind of address that is; kind is "" for any other address.
func embedded(ip netip.Addr) (v4 []netip.Addr, kind string) {
	b := ip.As16()
	switch {
	case nat64.Contains(ip):
		return []netip.Addr{netip.AddrFrom4([4]byte(b[12:16]))}, "a NAT64 address"
	case sixTo4.Contains(ip):
		return []netip.Addr{netip.AddrFrom4([4]byte(b[2:6]))}, "a 6to4 address"
	case teredo.Contains(ip):
		server := netip.AddrFrom4([4]byte(b[4:8]))
		client := netip.AddrFrom4([4]byte{^b[12], ^b[13], ^b[14], ^b[15]})
		return []netip.Addr{server, client}, "a Teredo address"
	}
	return nil, ""
}

// hostAddrsTTL bounds how stale the host's addresses may be: an address
// added to an interface is refused within this long.
const hostAddrsTTL = 10 * time.Second

// hostAddrs caches this machine's interface addresses.
type hostAddrs struct {
	read func() ([]netip.Addr, error)

	mu    sync.Mutex
	at    time.Time
	addrs []netip.Addr
	err   error
}

// contains reports whether ip is one of this host's addresses. A nil
// cache reads them afresh, so that the zero Guard is still strict.
func (h *hostAddrs) contains(ip netip.Addr) (bool, error) {
	if h == nil {
		addrs, err := interfaceAddrs()
		return slices.Contains(addrs, ip), err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.at.IsZero() || time.Since(h.at) >= hostAddrsTTL {
		// A failed read keeps the last good list: addresses rarely change,
		// and refusing every delivery over a transient error would be worse.
		if addrs, err := h.read(); err == nil || h.addrs == nil {
			h.addrs, h.err = addrs, err
		}
		h.at = time.Now()
	}
	return slices.Contains(h.addrs, ip), h.err
}

func interfaceAddrs() ([]netip.Addr, error) {
	as, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var ips []netip.Addr
	for _, a := range as {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				ips = append(ips, ip.Unmap())
			}
		}
	}
	return ips, nil
}

// maxURLLen bounds a target URL, which is stored and shown with every
// delivery.
const maxURLLen = 2048

// Check validates a target URL now: its shape, and every address its host
// resolves to. Sending checks again on the address actually connected to.
func (g Guard) Check(ctx context.Context, raw string) error {
	if len(raw) > maxURLLen {
		return fmt.Errorf("webhook url is longer than %d bytes", maxURLLen)
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Hostname() == "" {
		return errors.New("webhook url must be an http(s) URL with a host")
	}
	if u.User != nil {
		// Credentials in the URL would be shown with every delivery; the
		// signature is how a receiver authenticates us.
		return errors.New("webhook url must not contain a user or password")
	}
	host := u.Hostname()
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return fmt.Errorf("webhook url: cannot resolve %s: %w", host, err)
	}
	for _, ip := range ips {
		if why := g.refusal(ip); why != "" {
			return fmt.Errorf("%w: %s resolves to %s, %s", ErrBlocked, host, ip.Unmap(), why)
		}
	}
	return nil
}

// Client returns an HTTP client for deliveries: it refuses blocked addresses
// at connect time (so DNS cannot be changed under it), ignores proxies from
// the environment (a proxy would connect for us, unchecked), follows no
// redirects, and gives up after timeout.
func (g Guard) Client(timeout time.Duration) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second, Control: func(_, address string, _ syscall.RawConn) error {
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return fmt.Errorf("%w: cannot parse dialled address %q", ErrBlocked, address)
		}
		if why := g.refusal(ap.Addr()); why != "" {
			return fmt.Errorf("%w: dialling %s, %s", ErrBlocked, ap.Addr().Unmap(), why)
		}
		return nil
	}}
	// A receiver's headers are not read past 64 KiB: only its status
	// matters, and errors quoting them are stored.
	tr := &http.Transport{Proxy: nil, DialContext: d.DialContext, MaxIdleConnsPerHost: 16, IdleConnTimeout: 30 * time.Second,
		TLSHandshakeTimeout: 5 * time.Second, ResponseHeaderTimeout: timeout, MaxResponseHeaderBytes: 64 << 10}
	return &http.Client{Transport: tr, Timeout: timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

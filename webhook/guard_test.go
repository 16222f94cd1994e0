package webhook

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// testGuard returns a guard that sees host as this machine's addresses.
func testGuard(allowLoopback, allowPrivate bool, host ...string) Guard {
	var addrs []netip.Addr
	for _, h := range host {
		addrs = append(addrs, netip.MustParseAddr(h))
	}
	g := NewGuard(allowLoopback, allowPrivate)
	g.host.read = func() ([]netip.Addr, error) { return addrs, nil }
	return g
}

type verdicts struct {
	ip                       string
	strict, loopback, privat bool   // allowed by the strict guard, with AllowLoopback, with AllowPrivate
	why                      string // part of the strict guard's reason, if it refuses
}

func checkVerdicts(t *testing.T, tcs []verdicts, host ...string) {
	t.Helper()
	strict, loop, priv := testGuard(false, false, host...), testGuard(true, false, host...), testGuard(false, true, host...)
	for _, tc := range tcs {
		t.Run(tc.ip, func(t *testing.T) {
			ip := netip.MustParseAddr(tc.ip)
			if got := strict.Allowed(ip); got != tc.strict {
				t.Errorf("strict: allowed %v, want %v", got, tc.strict)
			}
			if got := loop.Allowed(ip); got != tc.loopback {
				t.Errorf("AllowLoopback: allowed %v, want %v", got, tc.loopback)
			}
			if got := priv.Allowed(ip); got != tc.privat {
				t.Errorf("AllowPrivate: allowed %v, want %v", got, tc.privat)
			}
			if why := strict.refusal(ip); !strings.Contains(why, tc.why) {
				t.Errorf("strict refusal %q, want it to mention %q", why, tc.why)
			}
		})
	}
}

// Every entry of the IANA IPv4 and IPv6 Special-Purpose Address Registries,
// plus multicast and the deprecated IPv6 ranges, with addresses either side
// of the boundaries where a neighbour is treated differently.
func TestGuardSpecialPurposeRanges(t *testing.T) {
	checkVerdicts(t, []verdicts{
		// Public.
		{"8.8.8.8", true, true, true, ""},
		{"1.1.1.1", true, true, true, ""},
		{"93.184.216.34", true, true, true, ""},
		{"2606:4700:4700::1111", true, true, true, ""},
		{"2a00:1450:4001::1", true, true, true, ""},

		// IPv4 Special-Purpose Address Registry.
		{"0.0.0.0", false, false, false, "unspecified"},
		{"0.0.0.1", false, false, false, "this network"},
		{"0.255.255.255", false, false, false, "this network"},
		{"10.0.0.1", false, false, true, "private"},
		{"10.255.255.255", false, false, true, "private"},
		{"100.64.0.1", false, false, true, "CGNAT"},
		{"100.127.255.255", false, false, true, "CGNAT"},
		{"100.128.0.1", true, true, true, ""},
		{"127.0.0.1", false, true, true, "loopback"},
		{"127.255.255.254", false, true, true, "loopback"},
		{"169.254.0.1", false, false, true, "link-local"},
		{"169.254.169.254", false, false, true, "metadata"},
		{"172.16.0.1", false, false, true, "private"},
		{"172.31.255.255", false, false, true, "private"},
		{"172.15.255.255", true, true, true, ""},
		{"172.32.0.1", true, true, true, ""},
		{"192.0.0.1", false, false, false, "DS-Lite"},
		{"192.0.0.7", false, false, false, "DS-Lite"},
		{"192.0.0.8", false, false, false, "dummy"},
		{"192.0.0.9", true, true, true, ""},
		{"192.0.0.10", true, true, true, ""},
		{"192.0.0.11", false, false, false, "IETF protocol assignment"},
		{"192.0.0.170", false, false, false, "NAT64/DNS64"},
		{"192.0.0.171", false, false, false, "NAT64/DNS64"},
		{"192.0.0.255", false, false, false, "IETF protocol assignment"},
		{"192.0.2.1", false, false, false, "documentation"},
		{"192.31.196.1", true, true, true, ""}, // AS112
		{"192.52.193.1", true, true, true, ""}, // AMT
		{"192.88.99.1", false, false, false, "6to4 relay"},
		{"192.168.0.1", false, false, true, "private"},
		{"192.168.255.255", false, false, true, "private"},
		{"192.175.48.1", true, true, true, ""}, // AS112 direct delegation
		{"198.18.0.1", false, false, false, "benchmarking"},
		{"198.19.255.255", false, false, false, "benchmarking"},
		{"198.17.255.255", true, true, true, ""},
		{"198.20.0.1", true, true, true, ""},
		{"198.51.100.1", false, false, false, "documentation"},
		{"203.0.113.1", false, false, false, "documentation"},
		{"240.0.0.1", false, false, false, "reserved"},
		{"255.255.255.254", false, false, false, "reserved"},
		{"255.255.255.255", false, false, false, "broadcast"},
		// IPv4 multicast.
		{"224.0.0.1", false, false, false, "multicast"},
		{"239.255.255.250", false, false, false, "multicast"},

		// IPv6 Special-Purpose Address Registry.
		{"::", false, false, false, "unspecified"},
		{"::1", false, true, true, "loopback"},
		{"::ffff:127.0.0.1", false, true, true, "loopback"},
		{"::ffff:10.0.0.1", false, false, true, "private"},
		{"::ffff:169.254.169.254", false, false, true, "metadata"},
		{"::ffff:8.8.8.8", true, true, true, ""},
		{"64:ff9b::808:808", true, true, true, ""},
		{"64:ff9b::a00:1", false, false, true, "NAT64 address for 10.0.0.1, a private"},
		{"64:ff9b:1::1", false, false, false, "local-use"},
		{"64:ff9b:1::808:808", false, false, false, "local-use"},
		{"100::1", false, false, false, "discard-only"},
		{"100:0:0:1::1", false, false, false, "dummy"},
		{"2001::1", false, false, false, "Teredo"}, // client 255.255.255.254, server 0.0.0.0
		{"2001:1::1", true, true, true, ""},        // PCP anycast
		{"2001:1::2", true, true, true, ""},        // TURN anycast
		{"2001:1::3", true, true, true, ""},        // DNS-SD SRP anycast
		{"2001:1::4", false, false, false, "IETF protocol assignment"},
		{"2001:2::1", false, false, false, "benchmarking"},
		{"2001:2:0:ffff::1", false, false, false, "benchmarking"},
		{"2001:3::1", true, true, true, ""}, // AMT
		{"2001:4::1", false, false, false, "IETF protocol assignment"},
		{"2001:4:112::1", true, true, true, ""}, // AS112-v6
		{"2001:10::1", false, false, false, "ORCHID"},
		{"2001:1f::1", false, false, false, "ORCHID"},
		{"2001:20::1", true, true, true, ""}, // ORCHIDv2
		{"2001:30::1", true, true, true, ""}, // drone remote ID
		{"2001:1ff::1", false, false, false, "IETF protocol assignment"},
		{"2001:200::1", true, true, true, ""},
		{"2001:db8::1", false, false, false, "documentation"},
		{"2002:808:808::1", true, true, true, ""},
		{"2002:a00:1::1", false, false, true, "6to4 address for 10.0.0.1"},
		{"2620:4f:8000::1", true, true, true, ""}, // AS112 direct delegation
		{"3fff::1", false, false, false, "documentation"},
		{"3fff:fff::1", false, false, false, "documentation"},
		{"3fff:1000::1", true, true, true, ""},
		{"5f00::1", false, false, false, "segment routing"},
		{"fc00::1", false, false, true, "unique local"},
		{"fd00::1", false, false, true, "unique local"},
		{"fd00:ec2::254", false, false, true, "metadata"},
		{"fe80::1", false, false, true, "link-local"},
		{"fe80::1%eth0", false, false, true, "link-local"},
		// Outside 2000::/3, deprecated, or not in the registry but never unicast.
		{"::127.0.0.1", false, false, false, "IPv4-compatible"},
		{"::8.8.8.8", false, false, false, "IPv4-compatible"},
		{"::ffff:0:808:808", false, false, false, "2000::/3"}, // SIIT IPv4-translated
		{"4000::1", false, false, false, "2000::/3"},
		{"1000::1", false, false, false, "2000::/3"},
		{"fec0::1", false, false, false, "site-local"},
		{"ff02::1", false, false, false, "multicast"},
		{"ff0e::1", false, false, false, "multicast"},
	})
}

// The addresses a security review found the old denylist accepting.
func TestGuardObservedBypasses(t *testing.T) {
	g := testGuard(false, false)
	for _, s := range []string{"::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1", "0.0.0.1", "255.255.255.255", "198.18.0.1"} {
		t.Run(s, func(t *testing.T) {
			if g.Allowed(netip.MustParseAddr(s)) {
				t.Fatal("allowed")
			}
		})
	}
	if g.Allowed(netip.Addr{}) {
		t.Fatal("the zero Addr allowed")
	}
}

func TestGuardEmbeddedIPv4(t *testing.T) {
	teredoServer := netip.MustParseAddr("65.54.227.120")
	forms := map[string]func(v4 netip.Addr) netip.Addr{
		"mapped": func(v4 netip.Addr) netip.Addr { return netip.AddrFrom16(v4.As16()) },
		"NAT64": func(v4 netip.Addr) netip.Addr {
			b := [16]byte{0x00, 0x64, 0xff, 0x9b}
			copy(b[12:], v4.AsSlice())
			return netip.AddrFrom16(b)
		},
		"6to4": func(v4 netip.Addr) netip.Addr {
			b := [16]byte{0x20, 0x02}
			copy(b[2:6], v4.AsSlice())
			b[15] = 1
			return netip.AddrFrom16(b)
		},
		"Teredo client": func(v4 netip.Addr) netip.Addr { return teredoAddr(teredoServer, v4) },
		"Teredo server": func(v4 netip.Addr) netip.Addr { return teredoAddr(v4, netip.MustParseAddr("8.8.4.4")) },
	}
	var tcs []verdicts
	for _, inner := range []verdicts{
		{"8.8.8.8", true, true, true, ""},
		{"1.1.1.1", true, true, true, ""},
		{"127.0.0.1", false, true, true, "loopback"},
		{"10.0.0.1", false, false, true, "private"},
		{"192.168.1.1", false, false, true, "private"},
		{"169.254.169.254", false, false, true, "metadata"},
		{"0.0.0.0", false, false, false, "unspecified"},
		{"198.18.0.1", false, false, false, "benchmarking"},
		{"255.255.255.255", false, false, false, "broadcast"},
	} {
		for _, form := range forms {
			tc := inner
			tc.ip = form(netip.MustParseAddr(inner.ip)).String()
			tcs = append(tcs, tc)
		}
	}
	// RFC 4380's example: server 65.54.227.120, client 192.0.2.45.
	tcs = append(tcs, verdicts{"2001:0:4136:e378:8000:63bf:3fff:fdd2", false, false, false, "Teredo address for 192.0.2.45, a documentation address"})
	checkVerdicts(t, tcs)
}

func teredoAddr(server, client netip.Addr) netip.Addr {
	b := [16]byte{0x20, 0x01, 0, 0}
	copy(b[4:8], server.AsSlice())
	b[8], b[10], b[11] = 0x80, 0xfb, 0x2e // flags, obfuscated port 1233
	for i, c := range client.As4() {
		b[12+i] = ^c
	}
	return netip.AddrFrom16(b)
}

// A receiver listening on 0.0.0.0 answers on every address of the host,
// so those count as loopback whatever range they are in, unless no option
// could open that range at all.
func TestGuardHostAddresses(t *testing.T) {
	host := []string{"93.184.216.34", "2606:2800:220:1::1", "10.1.2.3", "192.0.2.2", "fe80::1"}
	checkVerdicts(t, []verdicts{
		{"93.184.216.34", false, true, true, "this host's own address"},
		{"::ffff:93.184.216.34", false, true, true, "this host's own address"},
		{"64:ff9b::5db8:d822", false, true, true, "NAT64 address for 93.184.216.34, this host's own address"},
		{"2002:5db8:d822::1", false, true, true, "this host's own address"},
		{"2606:2800:220:1::1", false, true, true, "this host's own address"},
		{"10.1.2.3", false, true, true, "this host's own address"},
		{"fe80::1%eth0", false, true, true, "this host's own address"},
		{"192.0.2.2", false, false, false, "documentation"},
		{"93.184.216.35", true, true, true, ""},
		{"2606:2800:220:1::2", true, true, true, ""},
	}, host...)
}

func TestGuardReadsHostAddressesAtMostEvery10s(t *testing.T) {
	var reads int
	fail := false
	g := NewGuard(false, false)
	g.host.read = func() ([]netip.Addr, error) {
		reads++
		if fail {
			return nil, errors.New("netlink says no")
		}
		return []netip.Addr{netip.MustParseAddr("93.184.216.34")}, nil
	}
	own, other := netip.MustParseAddr("93.184.216.34"), netip.MustParseAddr("8.8.8.8")
	copied := g // copies share the cache
	for range 100 {
		if copied.Allowed(own) || !g.Allowed(other) {
			t.Fatal("wrong verdict")
		}
	}
	if reads != 1 {
		t.Fatalf("%d reads within the TTL, want 1", reads)
	}

	// A failed read keeps the last good list.
	fail = true
	g.host.at = time.Now().Add(-hostAddrsTTL)
	if g.Allowed(own) || !g.Allowed(other) || reads != 2 {
		t.Fatalf("after a failed refresh: reads %d", reads)
	}

	// With no list at all, nothing is allowed.
	g = NewGuard(true, true)
	g.host.read = func() ([]netip.Addr, error) { return nil, errors.New("netlink says no") }
	if why := g.refusal(other); !strings.Contains(why, "this host's own addresses (netlink says no)") {
		t.Fatalf("refusal %q", why)
	}
}

// The zero Guard reads the real interfaces on every check.
func TestZeroGuardRefusesThisHost(t *testing.T) {
	addrs, err := interfaceAddrs()
	if err != nil {
		t.Skip(err)
	}
	for _, a := range addrs {
		if (Guard{}).Allowed(a) {
			t.Errorf("this host's %s allowed", a)
		}
	}
	if !(Guard{}).Allowed(netip.MustParseAddr("8.8.8.8")) {
		t.Error("8.8.8.8 refused")
	}
}

func TestGuardRulesAreCanonical(t *testing.T) {
	seen := map[netip.Prefix]bool{}
	for _, r := range rules {
		if r.prefix != r.prefix.Masked() || seen[r.prefix] || r.reason == "" {
			t.Errorf("rule %s: not masked, duplicated or unexplained", r.prefix)
		}
		seen[r.prefix] = true
	}
}

func TestGuardCheck(t *testing.T) {
	for _, tc := range []struct {
		name, url string
		g         Guard
		blocked   bool   // want ErrBlocked
		want      string // part of the error; "" for none
	}{
		{"public", "https://8.8.8.8/hook", testGuard(false, false), false, ""},
		{"public v6 with port", "http://[2606:4700:4700::1111]:8443/hook?x=1", testGuard(false, false), false, ""},
		{"ftp", "ftp://8.8.8.8/x", testGuard(false, false), false, "http(s)"},
		{"no scheme", "8.8.8.8/x", testGuard(false, false), false, "http(s)"},
		{"no host", "http:///x", testGuard(false, false), false, "http(s)"},
		{"opaque", "http:8.8.8.8", testGuard(false, false), false, "http(s)"},
		{"unparsable", "http://[::1/x", testGuard(false, false), false, "http(s)"},
		{"user and password", "http://user:pass@8.8.8.8/x", testGuard(false, false), false, "user or password"},
		{"user", "https://user@8.8.8.8/x", testGuard(false, false), false, "user or password"},
		{"too long", "https://8.8.8.8/" + strings.Repeat("a", maxURLLen), testGuard(false, false), false, "longer than 2048"},
		{"localhost", "http://localhost:8080/hook", testGuard(false, false), true, "localhost resolves to"},
		{"localhost with loopback", "http://localhost:8080/hook", testGuard(true, false), false, ""},
		{"loopback literal", "http://127.0.0.1:9/x", testGuard(false, false), true, "127.0.0.1, a loopback address"},
		{"mapped metadata", "http://[::ffff:169.254.169.254]/latest", testGuard(true, false), true, "169.254.169.254, a cloud metadata address"},
		{"benchmarking", "http://198.18.0.1/", testGuard(false, true), true, "resolves to 198.18.0.1, a benchmarking address"},
		{"NAT64 loopback", "http://[64:ff9b::7f00:1]/", testGuard(false, false), true, "NAT64 address for 127.0.0.1, a loopback address"},
		{"private with private", "http://10.0.0.1/", testGuard(false, true), false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.g.Check(t.Context(), tc.url)
			if (err == nil) != (tc.want == "") || (err != nil && !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("error %v, want one mentioning %q", err, tc.want)
			}
			if errors.Is(err, ErrBlocked) != tc.blocked {
				t.Fatalf("errors.Is(%v, ErrBlocked) = %v", err, !tc.blocked)
			}
		})
	}
}

// The client checks the address it actually dials, so a name that passed
// Check and then resolves elsewhere is still refused.
func TestGuardClient(t *testing.T) {
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if r.URL.Path == "/redirect" {
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()

	t.Run("strict refuses loopback", func(t *testing.T) {
		_, err := testGuard(false, false).Client(5 * time.Second).Get(srv.URL)
		if !errors.Is(err, ErrBlocked) || !strings.Contains(err.Error(), "loopback") {
			t.Fatalf("error %v, want ErrBlocked naming loopback", err)
		}
		if hits.Load() != 0 {
			t.Fatal("the receiver was reached")
		}
	})
	t.Run("AllowLoopback connects", func(t *testing.T) {
		c := testGuard(true, false).Client(5 * time.Second)
		resp, err := c.Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent || hits.Load() != 1 {
			t.Fatalf("status %d, hits %d", resp.StatusCode, hits.Load())
		}
		resp, err = c.Get(srv.URL + "/redirect")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusFound || hits.Load() != 2 {
			t.Fatalf("redirect followed: status %d, hits %d", resp.StatusCode, hits.Load())
		}
		if c.Transport.(*http.Transport).Proxy != nil {
			t.Fatal("the client uses a proxy, which would connect unchecked")
		}
	})
}

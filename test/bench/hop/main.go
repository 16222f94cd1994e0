// Command hop is a do-nothing proxy for measuring what a hop costs on a
// machine, as a floor for what Levee adds (README, "Tests and benchmarks"):
//
//	go run ./test/bench/hop MODE LISTEN UPSTREAM &
//	go run ./test/bench/proxy -sim-addr UPSTREAM -via http://LISTEN
//
// MODE is tcp (a raw splice), std (httputil.ReverseProxy), fast (fasthttp
// server and client) or stdfast (net/http server, fasthttp client).
package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"

	"github.com/valyala/fasthttp"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: hop tcp|std|fast|stdfast LISTEN UPSTREAM")
		os.Exit(2)
	}
	mode, listen, up := os.Args[1], os.Args[2], os.Args[3]
	var err error
	switch mode {
	case "tcp":
		err = splice(listen, up)
	case "std":
		u := &url.URL{Scheme: "http", Host: up}
		p := httputil.NewSingleHostReverseProxy(u)
		p.Transport = &http.Transport{MaxIdleConnsPerHost: 1024}
		err = http.ListenAndServe(listen, p)
	case "fast":
		hc := &fasthttp.HostClient{Addr: up, MaxConns: 4096}
		err = (&fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
			ctx.Request.SetHost(up)
			if err := hc.Do(&ctx.Request, &ctx.Response); err != nil {
				ctx.Error(err.Error(), http.StatusBadGateway)
			}
		}}).ListenAndServe(listen)
	case "stdfast":
		err = stdServerFastClient(listen, up)
	default:
		err = fmt.Errorf("unknown mode %q", mode)
	}
	fmt.Fprintln(os.Stderr, "hop:", err)
	os.Exit(1)
}

func splice(listen, up string) error {
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			u, err := net.Dial("tcp", up)
			if err != nil {
				return
			}
			defer u.Close()
			go func() { _, _ = io.Copy(u, c) }()
			_, _ = io.Copy(c, u)
		}()
	}
}

func stdServerFastClient(listen, up string) error {
	hc := &fasthttp.HostClient{Addr: up, MaxConns: 4096}
	return http.ListenAndServe(listen, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
		defer fasthttp.ReleaseRequest(req)
		defer fasthttp.ReleaseResponse(resp)
		req.SetRequestURI("http://" + up + r.URL.RequestURI())
		req.Header.SetMethod(r.Method)
		for k, v := range r.Header {
			req.Header.Set(k, v[0])
		}
		b, _ := io.ReadAll(r.Body)
		req.SetBody(b)
		if err := hc.Do(req, resp); err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		w.Header().Set("Content-Type", string(resp.Header.ContentType()))
		w.WriteHeader(resp.StatusCode())
		_, _ = w.Write(resp.Body())
	}))
}

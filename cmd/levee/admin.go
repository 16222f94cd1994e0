package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/store"
)

// The administrative commands change Postgres through the same store
// functions as the admin API (each logged in the audit log as cli:$USER),
// and every running process picks the change up within seconds.

// openStore connects to --database-url or DATABASE_URL and migrates.
func openStore(ctx context.Context, fs *flag.FlagSet, args []string, getenv func(string) string) (*store.Store, []string, error) {
	url := fs.String("database-url", getenv("DATABASE_URL"), "Postgres URL")
	if err := fs.Parse(args); err != nil {
		return nil, nil, err
	}
	if *url == "" {
		return nil, nil, errors.New("no database: pass --database-url or set DATABASE_URL (levee dev prints it)")
	}
	st, err := store.Open(ctx, *url, 2)
	if err != nil {
		return nil, nil, err
	}
	if err := st.Migrate(ctx); err != nil {
		st.Close()
		return nil, nil, err
	}
	return st, fs.Args(), nil
}

func cliActor(getenv func(string) string) string {
	if u := getenv("USER"); u != "" {
		return "cli:" + u
	}
	return "cli"
}

func cmdMigrate(ctx context.Context, args []string, out io.Writer, getenv func(string) string) error {
	st, _, err := openStore(ctx, flag.NewFlagSet("migrate", flag.ContinueOnError), args, getenv)
	if err != nil {
		return err
	}
	st.Close()
	fmt.Fprintln(out, "migrations applied")
	return nil
}

// withName splits "NAME [flags]": the subject first, then its flags.
func withName(args []string, usage string) (string, []string, error) {
	if len(args) < 1 || strings.HasPrefix(args[0], "-") {
		return "", nil, errors.New("usage: " + usage)
	}
	return args[0], args[1:], nil
}

func cmdTenant(ctx context.Context, args []string, out io.Writer, getenv func(string) string) error {
	const usage = "levee tenant create NAME | list | update NAME [flags] | delete NAME [--force] | purge NAME|ID --yes"
	if len(args) == 0 {
		return errors.New("usage: " + usage)
	}
	actor := cliActor(getenv)
	switch args[0] {
	case "create":
		name, rest, err := withName(args[1:], "levee tenant create NAME [--default-priority high|normal|low]")
		if err != nil {
			return err
		}
		fs := flag.NewFlagSet("tenant create", flag.ContinueOnError)
		prio := fs.String("default-priority", "", "priority of its calls that ask for none: high (default), normal or low")
		st, _, err := openStore(ctx, fs, rest, getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		t, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: name, DefaultPriority: *prio, Actor: actor})
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "tenant %s created (id %s)\n", t.Name, t.ID)
		return nil
	case "list":
		st, _, err := openStore(ctx, flag.NewFlagSet("tenant list", flag.ContinueOnError), args[1:], getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tID\tDEFAULT PRIORITY\tCREATED")
		after := ""
		for {
			page, err := st.ListTenants(ctx, after, 100)
			if err != nil {
				return err
			}
			for _, t := range page {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.Name, t.ID, t.DefaultPriority, t.CreatedAt.UTC().Format(time.RFC3339))
			}
			if len(page) < 100 {
				return tw.Flush()
			}
			after = page[len(page)-1].Name
		}
	case "update":
		name, rest, err := withName(args[1:], "levee tenant update NAME [--default-priority P] [--tpm N] [--rpm N] [--concurrency N] [--model M] [--budget 500USD/month] [--budget-tokens N/day] ...")
		if err != nil {
			return err
		}
		qf := newQuotaFlags("tenant update")
		prio := qf.fs.String("default-priority", "", "priority of its calls that ask for none: high, normal or low")
		st, _, err := openStore(ctx, qf.fs, rest, getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		t, err := st.TenantByName(ctx, name)
		if err != nil {
			return err
		}
		if *prio != "" {
			if !slices.Contains(config.Priorities, *prio) {
				return errors.New("--default-priority must be high, normal or low")
			}
			if _, err := st.UpdateTenant(ctx, &store.UpdateTenantParams{ID: t.ID, DefaultPriority: prio, Actor: actor}); err != nil {
				return err
			}
			fmt.Fprintf(out, "default priority: %s\n", *prio)
		}
		return qf.apply(ctx, st, t.ID, uuid.Nil, out, getenv)
	case "delete":
		name, rest, err := withName(args[1:], "levee tenant delete NAME [--force]")
		if err != nil {
			return err
		}
		fs := flag.NewFlagSet("tenant delete", flag.ContinueOnError)
		force := fs.Bool("force", false, "cancel its queued and running jobs and batches")
		st, _, err := openStore(ctx, fs, rest, getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		t, err := st.TenantByName(ctx, name)
		if err != nil {
			return err
		}
		if err := st.DeleteTenant(ctx, t.ID, *force, actor); err != nil {
			if errors.Is(err, store.ErrHasWork) {
				return fmt.Errorf("%w; --force cancels it", err)
			}
			return err
		}
		fmt.Fprintf(out, "tenant %s deleted; its keys stop working within seconds\n", name)
		return nil
	case "purge":
		name, rest, err := withName(args[1:], "levee tenant purge NAME|ID --yes")
		if err != nil {
			return err
		}
		fs := flag.NewFlagSet("tenant purge", flag.ContinueOnError)
		yes := fs.Bool("yes", false, "really delete the tenant and all its data; there is no undo")
		batch := fs.Int("batch-size", 1000, "rows one delete takes at most")
		st, _, err := openStore(ctx, fs, rest, getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		if !*yes {
			return errors.New("levee tenant purge deletes the tenant and all its data for good: add --yes")
		}
		// A deleted tenant is found by its id only.
		id, err := uuid.Parse(name)
		if err != nil {
			t, err := st.TenantByName(ctx, name)
			if err != nil {
				return err
			}
			id = t.ID
		}
		purged, err := st.PurgeTenant(ctx, id, *batch, actor)
		if err != nil {
			return err
		}
		kinds := make([]string, 0, len(purged))
		for k := range purged {
			kinds = append(kinds, k)
		}
		sort.Strings(kinds)
		fmt.Fprintf(out, "tenant %s purged:\n", name)
		for _, k := range kinds {
			fmt.Fprintf(out, "  %-20s %d\n", k, purged[k])
		}
		return nil
	}
	return errors.New("usage: " + usage)
}

// scopeFlags are a key's scopes and expiry on the command line; a flag
// not given leaves that part as it is.
type scopeFlags struct {
	name, models, endpoints, maxPriority, cidrs, expires, defaultPriority string
	fs                                                                    *flag.FlagSet
}

func addScopeFlags(fs *flag.FlagSet) *scopeFlags {
	f := &scopeFlags{fs: fs}
	fs.StringVar(&f.name, "name", "", "a label for the key")
	fs.StringVar(&f.models, "models", "", "model aliases it may use, comma-separated (all: any)")
	fs.StringVar(&f.endpoints, "endpoints", "", "endpoint groups it may use, comma-separated, of "+strings.Join(config.EndpointGroups, ",")+" (all: any)")
	fs.StringVar(&f.maxPriority, "max-priority", "", "the highest priority it may ask for: high, normal or low (all: any)")
	fs.StringVar(&f.cidrs, "cidrs", "", "client address ranges it may be used from, comma-separated (all: any)")
	fs.StringVar(&f.expires, "expires", "", "when it stops working: RFC 3339, or a duration such as 720h (never: no expiry)")
	fs.StringVar(&f.defaultPriority, "default-priority", "", "priority of its calls that ask for none (tenant: its tenant's)")
	return f
}

func (f *scopeFlags) set(name string) bool {
	found := false
	f.fs.Visit(func(fl *flag.Flag) { found = found || fl.Name == name })
	return found
}

func list(v string) []string {
	if v == "all" {
		return nil
	}
	out := []string{}
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// scopes applies the flags given to cur; changed says whether any was.
func (f *scopeFlags) scopes(cur store.Scopes) (sc store.Scopes, changed bool, err error) {
	sc = cur
	if f.set("models") {
		sc.Models, changed = list(f.models), true
	}
	if f.set("endpoints") {
		sc.Endpoints, changed = list(f.endpoints), true
		for _, e := range sc.Endpoints {
			if !slices.Contains(config.EndpointGroups, e) {
				return sc, false, fmt.Errorf("--endpoints: %q is not one of %s", e, strings.Join(config.EndpointGroups, ", "))
			}
		}
	}
	if f.set("max-priority") {
		sc.MaxPriority, changed = f.maxPriority, true
		if sc.MaxPriority == "all" {
			sc.MaxPriority = ""
		}
		if sc.MaxPriority != "" && !slices.Contains(config.Priorities, sc.MaxPriority) {
			return sc, false, errors.New("--max-priority must be high, normal, low or all")
		}
	}
	if f.set("cidrs") {
		changed = true
		sc.CIDRs = nil
		if f.cidrs != "all" {
			sc.CIDRs = []netip.Prefix{}
			for _, c := range list(f.cidrs) {
				p, err := netip.ParsePrefix(c)
				if err != nil {
					return sc, false, fmt.Errorf("--cidrs: %q is not an address range such as 10.0.0.0/8", c)
				}
				sc.CIDRs = append(sc.CIDRs, p.Masked())
			}
		}
	}
	return sc, changed, nil
}

// expiry reads --expires: zero time for never; ok false when not given.
func (f *scopeFlags) expiry(now time.Time) (t time.Time, ok bool, err error) {
	if !f.set("expires") {
		return time.Time{}, false, nil
	}
	if f.expires == "never" {
		return time.Time{}, true, nil
	}
	if d, err := time.ParseDuration(f.expires); err == nil && d > 0 {
		return now.Add(d), true, nil
	}
	t, err = time.Parse(time.RFC3339, f.expires)
	if err != nil || !t.After(now) {
		return t, false, errors.New("--expires must be a time in the future (RFC 3339), a duration such as 720h, or never")
	}
	return t, true, nil
}

func cmdKey(ctx context.Context, args []string, out io.Writer, getenv func(string) string) error {
	const usage = "levee key create --tenant NAME [flags] | list --tenant NAME | update KEY_ID [flags] | revoke KEY_ID | rotate KEY_ID [--grace 24h]"
	if len(args) == 0 {
		return errors.New("usage: " + usage)
	}
	actor := cliActor(getenv)
	keyArg := func(u string) (uuid.UUID, []string, error) {
		v, rest, err := withName(args[1:], u)
		if err != nil {
			return uuid.Nil, nil, err
		}
		id, err := uuid.Parse(v)
		if err != nil {
			return uuid.Nil, nil, fmt.Errorf("%q is not a key id (levee key list prints them)", v)
		}
		return id, rest, nil
	}
	switch args[0] {
	case "create":
		fs := flag.NewFlagSet("key create", flag.ContinueOnError)
		tenant := fs.String("tenant", "", "tenant the key belongs to")
		sf := addScopeFlags(fs)
		st, _, err := openStore(ctx, fs, args[1:], getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		if *tenant == "" {
			return errors.New("--tenant is required")
		}
		sc, _, err := sf.scopes(store.Scopes{})
		if err != nil {
			return err
		}
		exp, _, err := sf.expiry(time.Now())
		if err != nil {
			return err
		}
		k, secret, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantName: *tenant, Name: sf.name, Scopes: sc, ExpiresAt: exp,
			DefaultPriority: sf.defaultPriority, Actor: actor})
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%s\n", secret)
		fmt.Fprintf(out, "# key %s for tenant %s; store it now, it is not shown again\n", k.ID, k.TenantName)
		return nil
	case "list":
		fs := flag.NewFlagSet("key list", flag.ContinueOnError)
		tenant := fs.String("tenant", "", "whose keys")
		st, _, err := openStore(ctx, fs, args[1:], getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		t, err := st.TenantByName(ctx, *tenant)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tPREFIX\tNAME\tSCOPES\tCREATED\tLAST USED\tEXPIRES\tREVOKED")
		after := uuid.Nil
		for {
			page, err := st.ListKeys(ctx, t.ID, after, 100)
			if err != nil {
				return err
			}
			for _, k := range page {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Prefix, k.Name, describeScopes(k.Scopes), stamp(k.CreatedAt),
					stamp(k.LastUsedAt), stamp(k.ExpiresAt), stamp(k.RevokedAt))
			}
			if len(page) < 100 {
				return tw.Flush()
			}
			after = page[len(page)-1].ID
		}
	case "update":
		id, rest, err := keyArg("levee key update KEY_ID [--name N] [--models a,b] [--endpoints chat,jobs] [--max-priority P] [--cidrs R] [--expires T] [limit and budget flags]")
		if err != nil {
			return err
		}
		qf := newQuotaFlags("key update")
		sf := addScopeFlags(qf.fs)
		st, _, err := openStore(ctx, qf.fs, rest, getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		k, err := st.KeyByID(ctx, id)
		if err != nil {
			return err
		}
		sc, changed, err := sf.scopes(k.Scopes)
		if err != nil {
			return err
		}
		exp, expSet, err := sf.expiry(time.Now())
		if err != nil {
			return err
		}
		p := &store.UpdateKeyParams{ID: id, Actor: actor}
		if sf.set("name") {
			p.Name = &sf.name
		}
		if sf.set("default-priority") {
			p.DefaultPriority = &sf.defaultPriority
		}
		if changed {
			p.Scopes = &sc
		}
		if expSet {
			p.ExpiresAt = &exp
		}
		if p.Name != nil || p.DefaultPriority != nil || p.Scopes != nil || p.ExpiresAt != nil {
			if k, err = st.UpdateKey(ctx, p); err != nil {
				return err
			}
			fmt.Fprintf(out, "key %s: %s, expires %s\n", k.ID, describeScopes(k.Scopes), stamp(k.ExpiresAt))
		}
		return qf.apply(ctx, st, k.TenantID, k.ID, out, getenv)
	case "revoke":
		id, rest, err := keyArg("levee key revoke KEY_ID")
		if err != nil {
			return err
		}
		st, _, err := openStore(ctx, flag.NewFlagSet("key revoke", flag.ContinueOnError), rest, getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		if _, err := st.RevokeKey(ctx, id, actor); err != nil {
			return err
		}
		fmt.Fprintf(out, "key %s revoked; every process refuses it within seconds\n", id)
		return nil
	case "rotate":
		id, rest, err := keyArg("levee key rotate KEY_ID [--grace 24h]")
		if err != nil {
			return err
		}
		fs := flag.NewFlagSet("key rotate", flag.ContinueOnError)
		grace := fs.Duration("grace", 0, "how long the old secret keeps working (at most 720h)")
		st, _, err := openStore(ctx, fs, rest, getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		if *grace < 0 || *grace > 30*24*time.Hour {
			return errors.New("--grace must be between 0 and 720h")
		}
		_, secret, err := st.RotateKey(ctx, id, *grace, actor)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%s\n", secret)
		fmt.Fprintf(out, "# the new secret of key %s; the old one works for %v more\n", id, *grace)
		return nil
	}
	return errors.New("usage: " + usage)
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func describeScopes(sc store.Scopes) string {
	var parts []string
	if sc.Models != nil {
		parts = append(parts, "models="+strings.Join(sc.Models, ","))
	}
	if sc.Endpoints != nil {
		parts = append(parts, "endpoints="+strings.Join(sc.Endpoints, ","))
	}
	if sc.MaxPriority != "" {
		parts = append(parts, "max-priority="+sc.MaxPriority)
	}
	if sc.CIDRs != nil {
		var cs []string
		for _, c := range sc.CIDRs {
			cs = append(cs, c.String())
		}
		parts = append(parts, "cidrs="+strings.Join(cs, ","))
	}
	if len(parts) == 0 {
		return "any"
	}
	return strings.Join(parts, " ")
}

func cmdAdminKey(ctx context.Context, args []string, out io.Writer, getenv func(string) string) error {
	const usage = "levee admin-key create [--name LABEL] | revoke ID"
	if len(args) == 0 {
		return errors.New("usage: " + usage)
	}
	switch args[0] {
	case "create":
		fs := flag.NewFlagSet("admin-key create", flag.ContinueOnError)
		name := fs.String("name", "", "a label for the key")
		st, _, err := openStore(ctx, fs, args[1:], getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		a, secret, err := st.CreateAdminKey(ctx, *name, cliActor(getenv))
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%s\n", secret)
		fmt.Fprintf(out, "# admin key %s; store it now, it is not shown again\n", a.ID)
		return nil
	case "revoke":
		v, rest, err := withName(args[1:], "levee admin-key revoke ID")
		if err != nil {
			return err
		}
		id, err := uuid.Parse(v)
		if err != nil {
			return fmt.Errorf("%q is not an admin key id", v)
		}
		st, _, err := openStore(ctx, flag.NewFlagSet("admin-key revoke", flag.ContinueOnError), rest, getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		if err := st.RevokeAdminKey(ctx, id, cliActor(getenv)); err != nil {
			return err
		}
		fmt.Fprintf(out, "admin key %s revoked\n", id)
		return nil
	}
	return errors.New("usage: " + usage)
}

func cmdUsage(ctx context.Context, args []string, out io.Writer, getenv func(string) string) error {
	if len(args) == 0 || args[0] != "export" {
		return errors.New("usage: levee usage export [--group-by tenant,key,model,deployment,day] [--start-date D] [--end-date D] [--tenant NAME] [--csv]")
	}
	fs := flag.NewFlagSet("usage export", flag.ContinueOnError)
	groupBy := fs.String("group-by", "tenant", "what to group by: "+strings.Join(store.UsageGroups, ","))
	from := fs.String("start-date", "", "first day, YYYY-MM-DD (default 30 days ago)")
	to := fs.String("end-date", "", "last day, YYYY-MM-DD (default today)")
	tenant := fs.String("tenant", "", "one tenant only")
	asCSV := fs.Bool("csv", false, "CSV instead of JSON lines")
	st, _, err := openStore(ctx, fs, args[1:], getenv)
	if err != nil {
		return err
	}
	defer st.Close()
	today := time.Now().UTC().Truncate(24 * time.Hour)
	p := &store.UsageExportParams{From: today.AddDate(0, 0, -30), To: today}
	for _, d := range []struct {
		v   string
		dst *time.Time
	}{{*from, &p.From}, {*to, &p.To}} {
		if d.v != "" {
			if *d.dst, err = time.Parse(time.DateOnly, d.v); err != nil {
				return fmt.Errorf("a date must be YYYY-MM-DD: %w", err)
			}
		}
	}
	for _, g := range list(*groupBy) {
		if !slices.Contains(store.UsageGroups, g) {
			return fmt.Errorf("--group-by: %q is not one of %s", g, strings.Join(store.UsageGroups, ", "))
		}
		p.GroupBy = append(p.GroupBy, g)
	}
	if *tenant != "" {
		t, err := st.TenantByName(ctx, *tenant)
		if err != nil {
			return err
		}
		p.TenantID = t.ID
	}
	// The admin API's columns and formatting, as CSV or one JSON object
	// per line.
	cols := store.UsageExportColumns(p.GroupBy)
	cw := csv.NewWriter(out)
	enc := json.NewEncoder(out)
	if *asCSV {
		if err := cw.Write(cols); err != nil {
			return err
		}
	}
	err = st.ExportUsage(ctx, p, func(r *store.UsageExportRow) error {
		vals := r.Values(p.GroupBy)
		if !*asCSV {
			row := make(map[string]string, len(cols))
			for i, c := range cols {
				row[c] = vals[i]
			}
			return enc.Encode(row)
		}
		if err := cw.Write(store.CSVCells(vals)); err != nil {
			return err
		}
		cw.Flush()
		return cw.Error()
	})
	cw.Flush()
	return err
}

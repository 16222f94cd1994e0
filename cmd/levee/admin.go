package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/store"
)

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

func cmdMigrate(ctx context.Context, args []string, out io.Writer, getenv func(string) string) error {
	st, _, err := openStore(ctx, flag.NewFlagSet("migrate", flag.ContinueOnError), args, getenv)
	if err != nil {
		return err
	}
	st.Close()
	fmt.Fprintln(out, "migrations applied")
	return nil
}

func cmdTenant(ctx context.Context, args []string, out io.Writer, getenv func(string) string) error {
	if len(args) > 0 && args[0] == "update" {
		// levee tenant update NAME [flags]: the name first, then flags.
		if len(args) < 2 || strings.HasPrefix(args[1], "-") {
			return errors.New("usage: levee tenant update NAME [--tpm N] [--rpm N] [--concurrency N] [--model M] [--budget 500USD/month] [--budget-tokens N/day] ...")
		}
		qf := newQuotaFlags("tenant update")
		st, _, err := openStore(ctx, qf.fs, args[2:], getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		t, err := st.TenantByName(ctx, args[1])
		if err != nil {
			return err
		}
		return qf.apply(ctx, st, t.ID, uuid.Nil, out, getenv)
	}
	if len(args) == 0 || args[0] != "create" {
		return errors.New("usage: levee tenant create NAME | levee tenant update NAME [flags]")
	}
	st, rest, err := openStore(ctx, flag.NewFlagSet("tenant create", flag.ContinueOnError), args[1:], getenv)
	if err != nil {
		return err
	}
	defer st.Close()
	if len(rest) != 1 {
		return errors.New("usage: levee tenant create NAME")
	}
	t, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: rest[0]})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "tenant %s created (id %s)\n", t.Name, t.ID)
	return nil
}

func cmdKey(ctx context.Context, args []string, out io.Writer, getenv func(string) string) error {
	if len(args) > 0 && args[0] == "update" {
		if len(args) < 2 || strings.HasPrefix(args[1], "-") {
			return errors.New("usage: levee key update KEY_ID [--tpm N] [--rpm N] [--concurrency N] [--model M] [--budget 50USD/day] ...")
		}
		id, err := uuid.Parse(args[1])
		if err != nil {
			return fmt.Errorf("%q is not a key id (levee key create prints it)", args[1])
		}
		qf := newQuotaFlags("key update")
		st, _, err := openStore(ctx, qf.fs, args[2:], getenv)
		if err != nil {
			return err
		}
		defer st.Close()
		k, err := st.KeyByID(ctx, id)
		if err != nil {
			return err
		}
		return qf.apply(ctx, st, k.TenantID, k.ID, out, getenv)
	}
	if len(args) == 0 || args[0] != "create" {
		return errors.New("usage: levee key create --tenant NAME [--name LABEL] | levee key update KEY_ID [flags]")
	}
	fs := flag.NewFlagSet("key create", flag.ContinueOnError)
	tenant := fs.String("tenant", "", "tenant the key belongs to")
	name := fs.String("name", "", "a label for the key")
	st, _, err := openStore(ctx, fs, args[1:], getenv)
	if err != nil {
		return err
	}
	defer st.Close()
	if *tenant == "" {
		return errors.New("--tenant is required")
	}
	k, secret, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantName: *tenant, Name: *name})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "%s\n", secret)
	fmt.Fprintf(out, "# key %s for tenant %s; store it now, it is not shown again\n", k.ID, k.TenantName)
	return nil
}

// Package migrations holds Levee's schema as numbered goose SQL files,
// embedded in the binary and applied at start-up by store.Migrate.
package migrations

import "embed"

// FS is the migration files.
//
//go:embed *.sql
var FS embed.FS

// Command ferretdb-zarkov runs the bundled MongoDB-compatible server for Zarkov's
// development and tests: FerretDB with SQLite storage, embedded as a library so that
// the module zip's missing version file (FerretDB issue 2982) does not matter.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/FerretDB/FerretDB/build/version"
	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27018", "TCP address to listen on")
	dataDir := flag.String("data", "var/ferretdb", "directory of the SQLite files")
	logLevel := flag.String("log-level", "error", "log level: debug, info, warn or error")
	idIndex := flag.Bool("id-index", true, "index the _id expression FerretDB queries with (see idindex.go)")
	synchronous := flag.String("synchronous", "normal", "SQLite synchronous mode: normal (WAL synced every -wal-sync, see walsync.go) or full (WAL synced at every commit)")
	walSync := flag.Duration("wal-sync", 100*time.Millisecond, "with -synchronous normal: how often the WAL files are synced to disk")
	flag.Parse()

	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		log.Fatalf("ferretdb: data dir %q: %v", *dataDir, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		log.Fatalf("ferretdb: data dir %q: %v", dir, err)
	}

	setVersion()
	removeEmptyDatabases(dir)

	if *synchronous != "normal" && *synchronous != "full" {
		log.Fatalf("ferretdb: -synchronous %q: want normal or full", *synchronous)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Handler:   "sqlite",
		SQLiteURL: "file:" + dir + "/?_pragma=synchronous(" + *synchronous + ")",
		Logger:    newLogger(*logLevel),
	})
	if err != nil {
		log.Fatalf("ferretdb: %v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *idIndex {
		go indexIDs(ctx, dir, 200*time.Millisecond, time.Second, newLogger(*logLevel))
	}

	if *synchronous == "normal" && *walSync > 0 {
		go syncWALs(ctx, dir, *walSync, newLogger(*logLevel))
	}

	fmt.Fprintf(os.Stderr, "ferretdb: listening on %s, data in %s\n", *listen, dir)
	if err := f.Run(ctx); err != nil && ctx.Err() == nil {
		log.Fatalf("ferretdb: %v", err)
	}
}

// newLogger returns a text logger on stderr at the named level.
func newLogger(level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		log.Fatalf("ferretdb: -log-level %q: %v", level, err)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

// setVersion makes buildInfo's ferretdbVersion say which FerretDB this is: embedded,
// FerretDB cannot read the version file that its module zip lacks and says
// "unknown", but the Go build records the module's version.
func setVersion() {
	info := version.Get()
	if info.Version != "unknown" {
		return
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range bi.Deps {
			if dep.Path == "github.com/FerretDB/FerretDB" {
				info.Version = dep.Version
			}
		}
	}
}

# Sourced by .ci/run: start a throwaway PostgreSQL if this machine has one, so the accounts tests also run
# against it (LLAMASCOPE_TEST_DATABASE_URL). Without one, those tests are skipped and nothing here fails.
start_test_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$bin" ] && [ -x "$bin/initdb" ] || { echo "ci: no PostgreSQL here; its tests are skipped"; return 0; }
  local user=postgres port=55433 dir
  id "$user" >/dev/null 2>&1 || { echo "ci: no postgres user; PostgreSQL tests skipped"; return 0; }
  dir=$(mktemp -d /tmp/llamascope-pg.XXXXXX)
  chown "$user" "$dir"
  if su "$user" -s /bin/sh -c "'$bin/initdb' -D '$dir/data' -A trust -U llamascope >'$dir/initdb.log' 2>&1 &&
      '$bin/pg_ctl' -D '$dir/data' -o '-p $port -k $dir -c listen_addresses=127.0.0.1' -l '$dir/pg.log' -w start >/dev/null" &&
     "$bin/psql" -h 127.0.0.1 -p "$port" -U llamascope -d postgres -qc "CREATE DATABASE llamascope_test" >/dev/null; then
    export LLAMASCOPE_TEST_DATABASE_URL="postgresql+psycopg://llamascope@127.0.0.1:$port/llamascope_test"
    trap "su '$user' -s /bin/sh -c \"'$bin/pg_ctl' -D '$dir/data' -m fast stop >/dev/null\"; rm -rf '$dir'" EXIT
    echo "ci: PostgreSQL on 127.0.0.1:$port for the accounts tests"
  else
    echo "ci: PostgreSQL did not start; its tests are skipped"
  fi
}

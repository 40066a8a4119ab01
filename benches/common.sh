# Shared by the benches (sourced, not run).

# scratch_app KELVIN: builds the example app's guests with KELVIN and writes
# a copy of functions.toml (or of $APP: an older binary may not read today's
# manifest) into $state whose state (cache, keys, ledger) lives there, so
# measurements never touch the app's own .kelvin.
scratch_app() {
  sed "s|^state_dir = .*|state_dir = \"$state\"|" "${APP:-functions.toml}" > "$state/functions.toml"
  sed -i "s|\"target/|\"$PWD/target/|" "$state/functions.toml"
  # Build commands run in the manifest's folder: send them back here.
  sed -i "s|^build = \"|build = \"cd '$PWD' \&\& |" "$state/functions.toml"
  # Builds the guests and precompiles them into the scratch state, so no
  # server measured here compiles anything (kelvin up would compile the
  # missing ones in the background, beside the measurement).
  "$1" build -f "$state/functions.toml" > "$state/build.log" 2>&1 ||
    { cat "$state/build.log" >&2; exit 1; }
}

# wait_ready URL: returns once URL answers 2xx; fails after 10 s.
wait_ready() {
  for _ in $(seq 200); do
    curl -fs "$1" > /dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "no answer from $1 within 10 s" >&2
  return 1
}

# build_predict: a release kelvin ($kelvin) and the Python guest built by
# its functions.toml command ($wasm), for the benches of that large component.
build_predict() {
  scripts/toolchains.sh python
  cargo build --quiet --release -p kelvin
  kelvin=$PWD/target/release/kelvin
  local build
  build=$(sed -n '/^\[functions.predict\]/,/^\[\[/s/^build = "\(.*\)"$/\1/p' functions.toml)
  sh -c "$build"
  wasm=$PWD/target/guests/predict.wasm
}

# build_event_bench GUEST_PACKAGE: a release kelvin ($kelvin), the
# events-load client ($loader) and GUEST_PACKAGE's guests ($guests), for the
# event and durable benches. KELVIN and GUESTS name another build's binary
# and guest folder instead, for an A/B.
build_event_bench() {
  cargo build --quiet --release -p kelvin
  cargo build --quiet --release -p kelvin-benches --bin events-load
  cargo build --quiet --profile guest --target wasm32-wasip1 -p "$1"
  kelvin=${KELVIN:-$PWD/target/release/kelvin}
  loader=$PWD/target/release/events-load
  guests=${GUESTS:-$PWD/target/wasm32-wasip1/guest}
}

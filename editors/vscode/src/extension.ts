// The VS Code client of dlm-ls. It starts `dlm-ls serve` through vscode-languageclient, whose
// inline-completion feature turns the server's items into ghost text, and adds what the generic
// client cannot know: a debounce and a per-language switch (middleware), a status-bar item with a
// spinner, and commands to fill holes, restart the server and show its status.
// How to start the server and the custom requests live in ./dlm.ts, which knows nothing of VS Code.

import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  InlineCompletionRequest,
  LanguageClient,
  LanguageClientOptions,
  Middleware,
  ServerOptions,
  State,
  TransportKind,
} from 'vscode-languageclient/node';
import * as dlm from './dlm';

let client: LanguageClient | undefined;
let settings: dlm.Settings;
let output: vscode.LogOutputChannel;
let statusItem: StatusItem;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  settings = readSettings();
  output = vscode.window.createOutputChannel('dlm-ls', { log: true });
  statusItem = new StatusItem();
  context.subscriptions.push(
    output,
    statusItem,
    vscode.commands.registerCommand('dlm.fill', fill),
    vscode.commands.registerCommand('dlm.restart', restart),
    vscode.commands.registerCommand('dlm.showStatus', showStatus),
    vscode.workspace.onDidChangeConfiguration(onConfigurationChanged),
  );
  await start();
}

export function deactivate(): Thenable<void> | undefined {
  return client?.stop();
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
    debounceMs: c.get('debounceMs', d.debounceMs),
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
    return statusItem.track(async () => next(document, position, context, token));
  },
};

async function start(): Promise<void> {
  const { command, args } = dlm.serverCommand(settings);
  const serverOptions: ServerOptions = { command, args, transport: TransportKind.stdio };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    initializationOptions: dlm.serverSettings(settings),
    outputChannel: output,
    middleware,
    connectionOptions: { maxRestartCount: 2 },
  };
  const c = new LanguageClient('dlm', 'dlm-ls', serverOptions, clientOptions);
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
  if (old) {
    await old.stop().catch(() => undefined);
  }
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

/** Fills the selection, or every hole marker in the document when nothing is selected. */
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
  const version = doc.version;
  let result: dlm.FillResult;
  try {
    result = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: 'dlm-ls: filling…', cancellable: true },
      (_progress, token) => statusItem.track(() => c.sendRequest(dlm.FillRequest, params, token)),
    );
  } catch (err) {
    if (!isCancellation(err)) {
      void vscode.window.showErrorMessage(`dlm-ls: fill failed: ${message(err)}`);
    }
    return;
  }
  if (!result?.edits?.length) {
    void vscode.window.showInformationMessage('dlm-ls: nothing to fill (select code, or mark holes with <|hole|>).');
    return;
  }
  if (doc.version !== version) {
    void vscode.window.showWarningMessage('dlm-ls: the document changed while filling; nothing applied.');
    return;
  }
  const edit = new vscode.WorkspaceEdit();
  edit.set(doc.uri, await c.protocol2CodeConverter.asTextEdits(result.edits));
  await vscode.workspace.applyEdit(edit);
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

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function isCancellation(err: unknown): boolean {
  return err instanceof Error && (err as { code?: number }).code === -32800;
}

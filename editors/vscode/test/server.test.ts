// The extension's client logic against the real `dlm-ls serve`, without VS Code: the command
// line and settings come from src/dlm.ts as in the extension, the capabilities are the ones
// VS Code's language client announces, and the messages go over vscode-jsonrpc.
//
// DLM_LS_SERVER (the dlm-ls executable) and DLM_LS_TEST_MODEL (a checkpoint folder) say which
// server and model to use; tests/test_vscode.py sets both. Without them the server tests skip.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import {
  CancellationTokenSource,
  createMessageConnection,
  type MessageConnection,
  ResponseError,
  StreamMessageReader,
  StreamMessageWriter,
} from 'vscode-jsonrpc/node';
import {
  ConfigurationRequest,
  DidChangeConfigurationNotification,
  DidChangeTextDocumentNotification,
  DidOpenTextDocumentNotification,
  ExitNotification,
  InitializedNotification,
  InitializeRequest,
  type InitializeResult,
  InlineCompletionRequest,
  InlineCompletionTriggerKind,
  type InlineCompletionItem,
  type InlineCompletionList,
  type ClientCapabilities,
  ShutdownRequest,
} from 'vscode-languageserver-protocol';
import { TextDocument } from 'vscode-languageserver-textdocument';
import * as dlm from '../src/dlm';

// What vscode-languageclient announces for the features this server cares about (abridged:
// the full object also lists every other language feature VS Code supports).
const VSCODE_CAPABILITIES: ClientCapabilities = {
  general: { positionEncodings: ['utf-16'], regularExpressions: { engine: 'ECMAScript', version: 'ES2020' } },
  workspace: {
    configuration: true,
    didChangeConfiguration: { dynamicRegistration: true },
    workspaceFolders: true,
    applyEdit: true,
    workspaceEdit: { documentChanges: true },
  },
  textDocument: {
    synchronization: { dynamicRegistration: true, willSave: true, willSaveWaitUntil: true, didSave: true },
    completion: {
      dynamicRegistration: true,
      contextSupport: true,
      completionItem: { snippetSupport: true, insertReplaceSupport: true },
    },
    inlineCompletion: { dynamicRegistration: true },
  },
  window: { workDoneProgress: true, showMessage: { messageActionItem: { additionalPropertiesSupport: true } } },
};

const SERVER = process.env.DLM_LS_SERVER;
const MODEL = process.env.DLM_LS_TEST_MODEL;
const skip = !SERVER || !MODEL ? 'set DLM_LS_SERVER and DLM_LS_TEST_MODEL to run against the server' : false;

const settings: dlm.Settings = {
  ...dlm.DEFAULTS,
  server: { path: SERVER ?? 'dlm-ls', extraArgs: ['--in-process'] },
  model: MODEL ?? '',
  device: 'cpu',
};

// Python the tiny test model can continue at several places; the model is random, so the
// tests check that items come back and have the right shape, not what they say.
const SOURCE = 'def add(a, b):\n    return a + b\n\n\ndef norm(x, y):\n    return (x ** 2 + y ** 2) ** 0.5\n\n\nfor i in range(10):\n    ';
const URI = 'file:///tmp/dlm-ls-vscode-test/example.py';

function items(result: InlineCompletionList | InlineCompletionItem[] | null): InlineCompletionItem[] {
  return result === null ? [] : Array.isArray(result) ? result : result.items;
}

function endOf(text: string): { line: number; character: number } {
  const lines = text.split('\n');
  return { line: lines.length - 1, character: lines[lines.length - 1].length };
}

describe('dlm.ts', () => {
  test('serverCommand runs `<path> serve` with the device, model and extra arguments', () => {
    const { command, args } = dlm.serverCommand({ ...dlm.DEFAULTS, model: '/m', server: { path: '/bin/x', extraArgs: ['--in-process'] } });
    assert.equal(command, '/bin/x');
    assert.deepEqual(args, ['serve', '--device', 'auto', '--model', '/m', '--in-process']);
    assert.deepEqual(dlm.serverCommand(dlm.DEFAULTS).args, ['serve', '--device', 'auto']);
  });

  test('enabledFor falls back to "*"', () => {
    assert.equal(dlm.enabledFor(dlm.DEFAULTS, 'python'), true);
    assert.equal(dlm.enabledFor(dlm.DEFAULTS, 'plaintext'), false);
    assert.equal(dlm.enabledFor({ ...dlm.DEFAULTS, enable: { '*': false, go: true } }, 'python'), false);
    assert.equal(dlm.enabledFor({ ...dlm.DEFAULTS, enable: { '*': false, go: true } }, 'go'), true);
  });

  test('debounce waits, and gives up as soon as the token is cancelled', async () => {
    const waited = new CancellationTokenSource();
    let t0 = Date.now();
    assert.equal(await dlm.debounce(60, waited.token), true);
    assert.ok(Date.now() - t0 >= 55);

    const typedOn = new CancellationTokenSource();
    t0 = Date.now();
    setTimeout(() => typedOn.cancel(), 10);
    assert.equal(await dlm.debounce(5000, typedOn.token), false);
    assert.ok(Date.now() - t0 < 1000);
  });

  test('the server pulls the settings the extension sends, never client-only ones', () => {
    const s = { ...settings, debounceMs: 75, model: '/models/x' };
    assert.deepEqual(dlm.configurationAnswer([{ section: 'dlm' }, { section: 'python' }, {}], s), [
      { model: '/models/x', device: s.device, debounceMs: 0, streamRefinement: false },
      null,
      null,
    ]);
    const team = { ...s, worker: 'tls://gpu-box:7000', tokenFile: '/home/me/.dlm-token', tlsCaFile: '' };
    assert.deepEqual(dlm.configurationAnswer([{ section: 'dlm' }], team), [
      { model: '/models/x', device: s.device, debounceMs: 0, streamRefinement: false,
        worker: 'tls://gpu-box:7000', tokenFile: '/home/me/.dlm-token' },
    ]);
  });

  test('a refinement state is cut into decided and undecided runs, its first line only', () => {
    const u = dlm.UNDECIDED;
    assert.deepEqual(dlm.refinementRuns(`ab${u}${u}c`), [
      { text: 'ab', undecided: false },
      { text: `${u}${u}`, undecided: true },
      { text: 'c', undecided: false },
    ]);
    assert.deepEqual(dlm.refinementRuns(`${u}x\ny`), [
      { text: u, undecided: true },
      { text: 'x', undecided: false },
      { text: ' …', undecided: true },
    ]);
    assert.deepEqual(dlm.refinementRuns(''), []);
  });

  test('statusLine shows the model folder name and the device', () => {
    assert.equal(dlm.statusLine({ model: '/x/tiny-model', device: 'cuda:0', worker_pid: null }), 'tiny-model · cuda:0');
    assert.equal(dlm.statusLine({ model: null, device: null, worker_pid: null }), 'dlm-ls');
  });
});

describe('against dlm-ls serve', { skip }, () => {
  let proc: ChildProcess;
  let conn: MessageConnection;
  let init: InitializeResult;
  let stderr = '';
  let version = 1;
  let text = SOURCE;

  before(async () => {
    const { command, args } = dlm.serverCommand(settings);
    proc = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    proc.stderr!.on('data', (chunk) => (stderr += chunk));
    conn = createMessageConnection(new StreamMessageReader(proc.stdout!), new StreamMessageWriter(proc.stdin!));
    // As the extension's middleware answers the server's pull of its `dlm` settings.
    conn.onRequest(ConfigurationRequest.type, (params) => dlm.configurationAnswer(params.items, settings));
    conn.listen();
    init = await conn.sendRequest(InitializeRequest.type, {
      processId: process.pid,
      clientInfo: { name: 'Visual Studio Code', version: '1.91.0' },
      rootUri: null,
      workspaceFolders: null,
      capabilities: VSCODE_CAPABILITIES,
      // A short canvas keeps the tiny model quick on a busy CPU; without the parse filter its
      // random text is shown rather than dropped; no background work competes.
      initializationOptions: { ...dlm.serverSettings(settings), maxTokens: 8, parseFilter: false, speculative: false, warm: false },
    });
    await conn.sendNotification(InitializedNotification.type, {});
    await conn.sendNotification(DidOpenTextDocumentNotification.type, {
      textDocument: { uri: URI, languageId: 'python', version, text },
    });
  });

  after(async () => {
    if (conn && proc.exitCode === null) {
      await conn.sendRequest(ShutdownRequest.type).catch(() => undefined);
      await conn.sendNotification(ExitNotification.type).catch(() => undefined);
    }
  });

  test('initialize: the server offers inline completion and incremental sync in UTF-16', () => {
    assert.ok(init.capabilities.inlineCompletionProvider, 'no inlineCompletionProvider');
    const sync = init.capabilities.textDocumentSync;
    assert.equal(typeof sync === 'object' ? sync.change : sync, 2);
    assert.equal(init.capabilities.positionEncoding ?? 'utf-16', 'utf-16');
  });

  test('an inline completion request returns an item at the cursor', { timeout: 60_000 }, async () => {
    const position = endOf(text);
    const result = await conn.sendRequest(InlineCompletionRequest.type, {
      textDocument: { uri: URI },
      position,
      context: { triggerKind: InlineCompletionTriggerKind.Automatic },
    });
    const got = items(result);
    assert.ok(got.length >= 1, `no items; server log:\n${stderr.slice(-2000)}`);
    const insert = got[0].insertText;
    assert.equal(typeof insert, 'string');
    assert.ok((insert as string).length > 0);
    if (got[0].range) {
      assert.deepEqual(got[0].range.start, position);
    }
  });

  test('a request cancelled through its token ends without an item, and the server goes on', { timeout: 60_000 }, async () => {
    // What VS Code does when the user types on: cancel the token of the request in flight.
    text += 'x';
    version += 1;
    await conn.sendNotification(DidChangeTextDocumentNotification.type, {
      textDocument: { uri: URI, version },
      contentChanges: [{ range: { start: endOf(text.slice(0, -1)), end: endOf(text.slice(0, -1)) }, text: 'x' }],
    });
    const source = new CancellationTokenSource();
    const pending = conn.sendRequest(
      InlineCompletionRequest.type,
      { textDocument: { uri: URI }, position: endOf(text), context: { triggerKind: InlineCompletionTriggerKind.Automatic } },
      source.token,
    );
    source.cancel();
    const outcome = await pending.then(
      (result) => ({ items: items(result) }),
      (err: unknown) => ({ err }),
    );
    if ('err' in outcome) {
      assert.ok(outcome.err instanceof ResponseError);
      assert.equal(outcome.err.code, -32800, `unexpected error ${outcome.err.message}`);
    }
    const status = await conn.sendRequest(dlm.StatusRequest, {});
    assert.ok(status.server, 'the server stopped answering after a cancellation');
  });

  test('dlm/status names the model and the device', { timeout: 60_000 }, async () => {
    const status = await conn.sendRequest(dlm.StatusRequest, {});
    assert.equal(typeof status.model, 'string', JSON.stringify(status));
    assert.equal(status.device, 'cpu');
    assert.match(dlm.statusLine(status), / · cpu$/);
    assert.match(dlm.statusTooltip(status), /device: cpu/);
  });

  test('settings changes reach the server', async () => {
    await conn.sendNotification(DidChangeConfigurationNotification.type, {
      settings: { dlm: { ...dlm.serverSettings(settings), maxTokens: 24 } },
    });
    const status = await conn.sendRequest(dlm.StatusRequest, {});
    const server = status.settings as Record<string, unknown>;
    assert.equal(server.max_tokens, 24);
    assert.equal(server.debounce_ms, 0);
  });

  test('dlm/fill returns text edits that fill a hole, and a range', { timeout: 60_000 }, async () => {
    const uri = URI.replace('example.py', 'holes.py');
    const source = 'def add(a, b):\n    return <|hole|>\n\n\nx = 1 + 2\n';
    await conn.sendNotification(DidOpenTextDocumentNotification.type, {
      textDocument: { uri, languageId: 'python', version: 1, text: source },
    });
    const doc = TextDocument.create(uri, 'python', 1, source);

    const holes = await conn.sendRequest(dlm.FillRequest, { textDocument: { uri } });
    assert.ok(holes.edits.length >= 1, JSON.stringify(holes));
    const filled = TextDocument.applyEdits(doc, holes.edits);
    assert.ok(!filled.includes('<|hole|>'), filled);
    assert.ok(filled.startsWith('def add(a, b):\n    return ') && filled.endsWith('x = 1 + 2\n'), filled);

    // The selection "1 + 2": only it is rewritten.
    const range = { start: { line: 4, character: 4 }, end: { line: 4, character: 9 } };
    const selection = await conn.sendRequest(dlm.FillRequest, { textDocument: { uri }, range });
    const rewritten = TextDocument.applyEdits(doc, selection.edits);
    assert.ok(rewritten.startsWith(source.slice(0, doc.offsetAt(range.start))), rewritten);
    assert.ok(rewritten.endsWith(source.slice(doc.offsetAt(range.end))), rewritten);
  });

  test('shutdown and exit end the process cleanly', { timeout: 30_000 }, async () => {
    const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
    await conn.sendRequest(ShutdownRequest.type);
    await conn.sendNotification(ExitNotification.type);
    assert.equal(await exited, 0);
  });
});

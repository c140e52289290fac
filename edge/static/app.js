// ChatterBot's chat page: plain browser JavaScript, no build step. It talks to the edge that served it.
//
// The API key lives in sessionStorage (this tab only) and travels in the X-API-Key header. Answers are queued
// turns (POST /stream-chat) read with an EventSource from the ticketed `stream_endpoint`; after a drop the
// page asks for a fresh ticket and resumes after the last event it saw, so no text repeats or goes missing.
// Stop cancels the turn (DELETE /stream/{id}), and with it the generation. Answers render as Markdown through
// marked, with raw HTML shown as text, and DOMPurify over the result. A stored tool turn shows as such: the
// answer's tool calls (function and arguments), then each tool's result, naming the call it answers.

import { marked } from "./vendor/marked.esm.js";

const KEY_STORAGE = "chatterbot.key";
const USER_STORAGE = "chatterbot.user";
const PREFS_STORAGE = "chatterbot.prefs";
const HISTORY_PAGE = 20;
const CONVERSATION_PAGE = 30;
const TITLE_CHARS = 60;

const $ = (id) => document.getElementById(id);
const el = {
  signin: $("signin"), signinForm: $("signin-form"), keyInput: $("key-input"), signinError: $("signin-error"),
  signinButton: $("signin-button"), app: $("app"), sidebar: $("sidebar"), scrim: $("scrim"),
  newChat: $("new-chat"), openSidebar: $("open-sidebar"), closeSidebar: $("close-sidebar"),
  userForm: $("user-form"), userId: $("user-id"), userApply: $("user-apply"), userHint: $("user-hint"),
  conversations: $("conversations"), conversationsEmpty: $("conversations-empty"),
  conversationsMore: $("conversations-more"), maxTokens: $("max-tokens"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), keyKind: $("key-kind"), keyLimits: $("key-limits"),
  signOut: $("sign-out"), chatTitle: $("chat-title"), model: $("model"), notice: $("notice"),
  noticeText: $("notice-text"), noticeClose: $("notice-close"), messages: $("messages"),
  historyTop: $("history-top"), historyLoading: $("history-loading"), messageList: $("message-list"),
  emptyChat: $("empty-chat"), streamStatus: $("stream-status"), composer: $("composer"),
  input: $("message-input"), send: $("send"), stop: $("stop"),
};

const state = {
  key: "",
  me: null, // GET /whoami
  userId: "",
  conversations: [],
  conversationsToken: null,
  conversationsLoading: false,
  current: null, // conversation id, null for a new chat
  nextBefore: null, // older history page cursor
  historyLoading: false,
  openGeneration: 0, // bumped on every open, so that a slow page of an older one is dropped
  stream: null, // the answer being streamed
  noticeTimer: null,
};

// --- Markdown, safely ---------------------------------------------------------------------------------------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Raw HTML in a message is shown as the text it is, never parsed; DOMPurify then cleans what marked made.
marked.use({
  gfm: true,
  breaks: true,
  renderer: { html: ({ text, block }) => (block ? `<p class="raw">${escapeHtml(text.trim())}</p>` : escapeHtml(text)) },
});

let purifyHooked = false;
function renderMarkdown(text) {
  const purify = window.DOMPurify;
  if (!purifyHooked) {
    purify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
    purifyHooked = true;
  }
  return purify.sanitize(marked.parse(text), {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe"],
    FORBID_ATTR: ["style"],
  });
}

// --- the API ------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, { retryAfter = null, requestId = null, detail = null } = {}) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
    this.requestId = requestId;
    this.detail = detail;
  }
}

function describeFailure(status, detail, retryAfter) {
  const wait = retryAfter ? ` Try again in ${retryAfter} s.` : " Try again in a moment.";
  if (status === 401) return "The API key is missing or was not accepted.";
  if (status === 403) return detail ? `Not allowed: ${detail}.` : "This key is not allowed to do that.";
  if (status === 404) return detail ? `Not found: ${detail}.` : "Not found: it may have been deleted.";
  if (status === 413) return "That message is too large to send.";
  if (status === 422) return detail ? `The request was not accepted: ${detail}.` : "The request was not accepted.";
  if (status === 429) return `${tooMany(detail)}.${wait}`;
  if (status === 503) return `ChatterBot is unavailable right now${detail ? ` (${detail})` : ""}.${wait}`;
  if (status === 504) return "The answer took too long. Try again, perhaps with a shorter question.";
  if (status >= 500) return `The server failed to answer (${status}).${wait}`;
  return detail || `The request failed (${status}).`;
}

// "too many requests with this key; retry after ..." reads "Too many requests with this key".
function tooMany(detail) {
  const reason = (detail || "").split(";")[0].trim();
  if (!reason) return "Too many requests";
  return /^too many/i.test(reason) ? reason[0].toUpperCase() + reason.slice(1) : `Too many requests: ${reason}`;
}

async function failureOf(response) {
  let detail = null;
  try {
    const body = await response.json();
    detail = body.detail || body.title || null;
  } catch {
    // not a problem body: the status says enough
  }
  const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  const retryAfter = Number.isFinite(retry) ? retry : null;
  return new ApiError(response.status, describeFailure(response.status, detail, retryAfter), {
    retryAfter, requestId: response.headers.get("X-Request-ID"), detail,
  });
}

async function api(method, path, { body, query, key = state.key } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  const headers = { "X-API-Key": key, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "Cannot reach ChatterBot. Check your connection; the page retries on its own.");
  }
  if (!response.ok) throw await failureOf(response);
  return response.status === 204 ? null : response.json();
}

const userPath = (path) => `${path}/${encodeURIComponent(state.userId)}`;

// --- notices ------------------------------------------------------------------------------------------------

function showNotice(error, kind = "error") {
  clearInterval(state.noticeTimer);
  el.notice.classList.toggle("info", kind === "info");
  const text = typeof error === "string" ? error : error.message;
  const suffix = error.requestId && error.status >= 500 ? ` (request ${error.requestId})` : "";
  el.noticeText.textContent = text + suffix;
  el.notice.hidden = false;
  if (error.retryAfter) {
    // Count the wait down, so the message says when to try again rather than when it was shown.
    const until = Date.now() + error.retryAfter * 1000;
    state.noticeTimer = setInterval(() => {
      const left = Math.ceil((until - Date.now()) / 1000);
      if (left <= 0) {
        clearInterval(state.noticeTimer);
        el.noticeText.textContent = text.replace(/Try again in \d+ s\./, "You can try again now.") + suffix;
      } else {
        el.noticeText.textContent = text.replace(/in \d+ s\./, `in ${left} s.`) + suffix;
      }
    }, 1000);
  }
}

function hideNotice() {
  clearInterval(state.noticeTimer);
  el.notice.hidden = true;
}

function setStreamStatus(text) {
  el.streamStatus.textContent = text || "";
  el.streamStatus.hidden = !text;
}

// --- signing in ---------------------------------------------------------------------------------------------

async function signIn(key, { remembered = false } = {}) {
  el.signinButton.disabled = true;
  el.signinError.hidden = true;
  try {
    state.me = await api("GET", "/whoami", { key });
  } catch (error) {
    el.signinButton.disabled = false;
    // A key that no longer works is forgotten; one that could not be checked (the edge is away) is kept.
    if (remembered && (error.status === 401 || error.status === 403)) sessionStorage.removeItem(KEY_STORAGE);
    showSignin(
      error.status === 403 || error.status === 401
        ? `That key was not accepted${error.detail ? ` (${error.detail})` : ""}. Check it and paste it again.`
        : error.message,
    );
    return;
  }
  el.signinButton.disabled = false;
  state.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
  el.keyInput.value = "";
  el.signin.hidden = true;
  el.app.hidden = false;
  describeKey();
  loadModels();
  const own = state.me.may_act_for_any_user ? sessionStorage.getItem(USER_STORAGE) || "" : state.me.user_id;
  await actAs(own);
}

function showSignin(error) {
  el.app.hidden = true;
  el.signin.hidden = false;
  el.signinError.textContent = error || "";
  el.signinError.hidden = !error;
  el.keyInput.focus();
}

function signOut() {
  stopStreaming({ cancel: false });
  sessionStorage.removeItem(KEY_STORAGE);
  sessionStorage.removeItem(USER_STORAGE);
  Object.assign(state, { key: "", me: null, userId: "", conversations: [], current: null });
  el.conversations.replaceChildren();
  clearMessages();
  history.replaceState(null, "", location.pathname);
  hideNotice();
  showSignin("");
}

function describeKey() {
  const me = state.me;
  el.keyKind.textContent = `${me.kind} key`;
  const chatLimits = me.limits.counted ? me.limits.routes["/stream-chat"] || [] : [];
  const parts = chatLimits.length ? [`Chats: ${chatLimits.join(", ")}`] : [];
  if (me.limits.counted && me.limits.tokens_per_minute) parts.push(`${me.limits.tokens_per_minute} tokens a minute`);
  el.keyLimits.textContent = parts.join(" · ");
  el.userId.readOnly = !me.may_act_for_any_user;
  el.userApply.hidden = !me.may_act_for_any_user;
  el.userHint.textContent = me.may_act_for_any_user
    ? "This key may act for any user: choose whose conversations to open."
    : "";
  el.input.maxLength = me.max_message_chars;
}

async function loadModels() {
  try {
    const models = await api("GET", "/v1/models");
    const saved = prefs().model;
    el.model.replaceChildren(
      ...models.data.map((m) => new Option(m.id, m.id, false, m.id === saved)),
    );
  } catch (error) {
    el.model.replaceChildren(new Option("default model", ""));
  }
}

// --- acting as a user ---------------------------------------------------------------------------------------

async function actAs(userId) {
  userId = (userId || "").trim();
  el.userId.value = userId;
  if (userId.length < 3 || userId.length > 50) {
    state.userId = "";
    el.conversations.replaceChildren();
    el.conversationsEmpty.hidden = true;
    clearMessages();
    setComposerEnabled(false);
    el.userHint.textContent = "Choose the user_id to act as (3 to 50 characters).";
    openDrawer();
    el.userId.focus();
    return;
  }
  if (state.me.may_act_for_any_user) {
    sessionStorage.setItem(USER_STORAGE, userId);
    el.userHint.textContent = "This key may act for any user: choose whose conversations to open.";
  }
  const changed = state.userId !== userId;
  state.userId = userId;
  setComposerEnabled(true);
  closeDrawer();
  await loadConversations({ reset: true });
  const wanted = conversationFromHash();
  if (wanted && (changed || state.current !== wanted)) await openConversation(wanted);
  else if (changed) newChat();
}

function setComposerEnabled(enabled) {
  el.input.disabled = !enabled;
  el.send.disabled = !enabled;
  el.newChat.disabled = !enabled;
}

// --- conversations ------------------------------------------------------------------------------------------

async function loadConversations({ reset = false } = {}) {
  if (state.conversationsLoading || (!reset && !state.conversationsToken) || !state.userId) return;
  state.conversationsLoading = true;
  try {
    const page = await api("GET", userPath("/conversations"), {
      query: { limit: CONVERSATION_PAGE, page_token: reset ? null : state.conversationsToken },
    });
    state.conversations = reset ? page.conversations : [...state.conversations, ...page.conversations];
    state.conversationsToken = page.next_page_token;
    renderConversations();
  } catch (error) {
    showNotice(error);
  } finally {
    state.conversationsLoading = false;
  }
}

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
function when(iso) {
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  const steps = [[60, "second"], [3600, "minute"], [86400, "hour"], [604800, "day"], [2629800, "week"],
    [31557600, "month"], [Infinity, "year"]];
  let unit = 1;
  for (const [limit, name] of steps) {
    if (Math.abs(seconds) < limit) return relative.format(Math.round(seconds / unit), name);
    unit = limit;
  }
  return "";
}

function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "icon");
  const use = document.createElementNS("http://www.w3.org/2000/svg", "use");
  use.setAttribute("href", `#i-${name}`);
  svg.append(use);
  return svg;
}

function button(className, label, content, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  if (label) b.setAttribute("aria-label", label);
  if (label) b.title = label;
  b.append(...[].concat(content));
  b.addEventListener("click", onClick);
  return b;
}

function renderConversations() {
  el.conversations.replaceChildren(...state.conversations.map(conversationItem));
  el.conversationsEmpty.hidden = state.conversations.length > 0;
}

function conversationItem(c) {
  const li = document.createElement("li");
  li.className = "conversation" + (c.conversation_id === state.current ? " current" : "");
  li.dataset.id = c.conversation_id;
  const open = button("open", null, [], () => {
    closeDrawer();
    openConversation(c.conversation_id);
  });
  const title = document.createElement("span");
  title.className = "title";
  title.textContent = c.title;
  const time = document.createElement("span");
  time.className = "when";
  time.textContent = when(c.updated_at);
  open.append(title, time);
  if (c.conversation_id === state.current) open.setAttribute("aria-current", "page");
  const actions = document.createElement("span");
  actions.className = "actions";
  actions.append(
    button("icon-button rename-button", `Rename “${c.title}”`, icon("edit"), () => startRename(li, c)),
    button("icon-button delete-button", `Delete “${c.title}”`, icon("trash"), () => confirmDelete(li, c)),
  );
  li.append(open, actions);
  return li;
}

function startRename(li, c) {
  const form = document.createElement("form");
  form.className = "rename";
  const input = document.createElement("input");
  input.value = c.title;
  input.maxLength = 200;
  input.setAttribute("aria-label", "New title");
  const save = document.createElement("button");
  save.type = "submit";
  save.className = "secondary";
  save.textContent = "Save";
  form.append(input, save);
  const cancel = () => li.replaceWith(conversationItem(c));
  input.addEventListener("keydown", (e) => {
    if (e.key === "Escape") cancel();
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const title = input.value.trim();
    if (!title || title === c.title) return cancel();
    save.disabled = true;
    try {
      const renamed = await api("PUT", `/conversations/${encodeURIComponent(c.conversation_id)}/title`, {
        body: { user_id: state.userId, title },
      });
      Object.assign(c, renamed);
      if (state.current === c.conversation_id) el.chatTitle.textContent = c.title;
      cancel();
    } catch (error) {
      save.disabled = false;
      showNotice(error);
    }
  });
  li.replaceChildren(form);
  input.focus();
  input.select();
}

function confirmDelete(li, c) {
  const box = document.createElement("div");
  box.className = "confirm";
  const text = document.createElement("span");
  text.textContent = "Delete this chat?";
  box.append(
    text,
    button("danger", null, "Delete", async () => {
      try {
        await api("DELETE", `/conversations/${encodeURIComponent(c.conversation_id)}`, {
          query: { user_id: state.userId },
        });
        state.conversations = state.conversations.filter((x) => x.conversation_id !== c.conversation_id);
        renderConversations();
        if (state.current === c.conversation_id) newChat();
      } catch (error) {
        showNotice(error);
        li.replaceWith(conversationItem(c));
      }
    }),
    button("secondary", null, "Keep", () => li.replaceWith(conversationItem(c))),
  );
  li.replaceChildren(box);
  box.querySelector(".secondary").focus();
}

function markCurrent() {
  for (const li of el.conversations.children) {
    const current = li.dataset.id === state.current;
    li.classList.toggle("current", current);
    const open = li.querySelector(".open");
    if (open) open.toggleAttribute("aria-current", current);
  }
}

function conversationFromHash() {
  const match = /^#\/c\/([A-Za-z0-9_.:-]{1,64})$/.exec(location.hash);
  return match ? match[1] : null;
}

// --- messages -----------------------------------------------------------------------------------------------

function clearMessages() {
  el.messageList.replaceChildren();
  el.emptyChat.hidden = false;
  state.nextBefore = null;
}

function messageItem(role, content, meta) {
  const li = document.createElement("li");
  li.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "content";
  li.append(body);
  setContent(li, role, content);
  if (meta) setMeta(li, meta);
  return li;
}

function setContent(li, role, text) {
  const body = li.querySelector(".content");
  if (role === "user") body.textContent = text;
  else body.innerHTML = renderMarkdown(text);
}

function setMeta(li, text) {
  let meta = li.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("div");
    meta.className = "meta";
    li.append(meta);
  }
  meta.textContent = text;
}

function addCopyButtons(li) {
  for (const pre of li.querySelectorAll("pre")) {
    const copy = button("copy", "Copy code", "Copy", async () => {
      try {
        await navigator.clipboard.writeText(pre.querySelector("code")?.textContent ?? pre.textContent);
        copy.textContent = "Copied";
      } catch {
        copy.textContent = "Cannot copy";
      }
      setTimeout(() => (copy.textContent = "Copy"), 1500);
    });
    pre.append(copy);
  }
}

function answerMeta(model, seconds) {
  return [model, seconds ? `${seconds.toFixed(1)} s` : ""].filter(Boolean).join(" · ");
}

// A tool call's arguments or a tool's result: JSON pretty-printed, anything else as the text it is.
function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

// A labelled block of a tool turn: a head (icon, label, function name, call id) over a code block.
function toolBlock(className, iconName, label, name, callId, text) {
  const block = document.createElement("div");
  block.className = `tool-block ${className}`;
  block.dataset.callId = callId;
  const head = document.createElement("div");
  head.className = "tool-head";
  const caption = document.createElement("span");
  caption.className = "tool-label";
  caption.textContent = label;
  const fn = document.createElement("code");
  fn.className = "tool-name";
  fn.textContent = name;
  const id = document.createElement("span");
  id.className = "tool-id";
  id.textContent = callId;
  id.title = callId; // shown whole where the head has no room for it
  head.append(icon(iconName), caption, fn, id);
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  code.textContent = pretty(text);
  pre.append(code);
  block.append(head, pre);
  return block;
}

// An answer that called tools: its text (if any), then each call with its arguments.
function toolCallsItem(m) {
  const li = messageItem("assistant", m.content, answerMeta(m.model, m.processing_time));
  li.classList.add("tool-calls");
  li.querySelector(".content").after(
    ...m.tool_calls.map((c) => toolBlock("tool-call", "tool", "Called", c.function.name, c.id, c.function.arguments)),
  );
  return li;
}

// A tool's result, naming the call it answers (the function's name is filled in by nameToolResults).
function toolResultItem(m) {
  const li = document.createElement("li");
  li.className = "message tool";
  li.append(toolBlock("tool-result", "result", "Result of", "", m.tool_call_id, m.content));
  return li;
}

// Each result gets the name of the function whose call it answers, once that call is on the page.
function nameToolResults() {
  const names = new Map();
  for (const call of el.messageList.querySelectorAll(".tool-call")) {
    names.set(call.dataset.callId, call.querySelector(".tool-name").textContent);
  }
  for (const result of el.messageList.querySelectorAll(".tool-result")) {
    result.querySelector(".tool-name").textContent = names.get(result.dataset.callId) || "a tool call";
  }
}

function historyItems(messages) {
  return messages
    .filter((m) => m.role === "user" || m.role === "assistant" || m.role === "tool")
    .map((m) => {
      let li;
      if (m.role === "tool") li = toolResultItem(m);
      else if (m.tool_calls) li = toolCallsItem(m);
      else li = messageItem(m.role, m.content, m.role === "assistant" ? answerMeta(m.model, m.processing_time) : "");
      li.dataset.messageId = m.message_id;
      if (m.role !== "user") addCopyButtons(li);
      return li;
    });
}

const nearBottom = () => el.messages.scrollHeight - el.messages.scrollTop - el.messages.clientHeight < 80;
const scrollToBottom = () => (el.messages.scrollTop = el.messages.scrollHeight);

async function openConversation(id) {
  stopStreaming({ cancel: false });
  hideNotice();
  const generation = ++state.openGeneration;
  state.current = id;
  if (location.hash !== `#/c/${id}`) history.replaceState(null, "", `#/c/${id}`);
  markCurrent();
  const known = state.conversations.find((c) => c.conversation_id === id);
  el.chatTitle.textContent = known ? known.title : "Conversation";
  clearMessages();
  el.emptyChat.hidden = true;
  try {
    const page = await api("GET", userPath("/history"), { query: { conversation_id: id, limit: HISTORY_PAGE } });
    if (generation !== state.openGeneration) return;
    el.messageList.replaceChildren(...historyItems(page.messages));
    nameToolResults();
    el.emptyChat.hidden = page.messages.length > 0;
    state.nextBefore = page.next_before;
    scrollToBottom();
    // A short first page leaves no room to scroll up: fetch older ones until the view is full.
    while (state.nextBefore && el.messages.scrollHeight <= el.messages.clientHeight) {
      if (!(await loadOlder())) break;
    }
  } catch (error) {
    if (generation !== state.openGeneration) return;
    if (error.status === 404) {
      showNotice("That conversation no longer exists.", "info");
      newChat();
    } else {
      showNotice(error);
    }
  }
  el.input.focus();
}

async function loadOlder() {
  if (state.historyLoading || !state.nextBefore || !state.current) return false;
  state.historyLoading = true;
  el.historyLoading.hidden = false;
  const generation = state.openGeneration;
  try {
    const page = await api("GET", userPath("/history"), {
      query: { conversation_id: state.current, limit: HISTORY_PAGE, before: state.nextBefore },
    });
    if (generation !== state.openGeneration) return false;
    // Keep what is on screen where it is while the older messages go in above it.
    const fromBottom = el.messages.scrollHeight - el.messages.scrollTop;
    el.messageList.prepend(...historyItems(page.messages));
    nameToolResults();
    el.messages.scrollTop = el.messages.scrollHeight - fromBottom;
    state.nextBefore = page.next_before;
    return true;
  } catch (error) {
    showNotice(error);
    return false;
  } finally {
    state.historyLoading = false;
    el.historyLoading.hidden = true;
  }
}

function newChat() {
  stopStreaming({ cancel: false });
  state.openGeneration++;
  state.current = null;
  if (location.hash) history.replaceState(null, "", location.pathname);
  el.chatTitle.textContent = "New chat";
  clearMessages();
  markCurrent();
  closeDrawer();
  el.input.focus();
}

// --- sending and streaming ----------------------------------------------------------------------------------

function prefs() {
  try {
    return JSON.parse(localStorage.getItem(PREFS_STORAGE) || "{}");
  } catch {
    return {};
  }
}

function savePrefs() {
  localStorage.setItem(
    PREFS_STORAGE,
    JSON.stringify({ model: el.model.value, maxTokens: el.maxTokens.value, temperature: el.temperature.value }),
  );
}

function turnSettings() {
  const maxTokens = Math.min(1024, Math.max(10, Number.parseInt(el.maxTokens.value, 10) || 256));
  const temperature = Math.min(1, Math.max(0.1, Number.parseFloat(el.temperature.value) || 0.7));
  return { max_tokens: maxTokens, temperature, ...(el.model.value ? { model: el.model.value } : {}) };
}

async function send(text) {
  if (state.stream || !state.userId) return;
  hideNotice();
  el.emptyChat.hidden = true;
  const userLi = messageItem("user", text);
  const answerLi = messageItem("assistant", "");
  answerLi.classList.add("streaming");
  el.messageList.append(userLi, answerLi);
  scrollToBottom();
  el.input.value = "";
  autosize();
  const stream = { cid: null, es: null, lastId: 0, text: "", li: answerLi, finished: false, stopped: false, frame: 0 };
  state.stream = stream;
  setStreaming(true);
  try {
    if (!state.current) {
      const created = await api("POST", "/conversations", {
        body: { user_id: state.userId, title: text.replace(/\s+/g, " ").trim().slice(0, TITLE_CHARS) },
      });
      state.current = created.conversation_id;
      state.openGeneration++;
      history.replaceState(null, "", `#/c/${created.conversation_id}`);
      el.chatTitle.textContent = created.title;
      state.conversations = [created, ...state.conversations];
      renderConversations();
    }
    const queued = await api("POST", "/stream-chat", {
      body: { message: text, user_id: state.userId, conversation_id: state.current, ...turnSettings() },
    });
    stream.cid = queued.correlation_id;
    if (stream.stopped) return cancelTurn(stream);
    connect(stream, queued.stream_endpoint);
  } catch (error) {
    // Nothing was queued: take the turn back off the screen and give the text back to edit or resend.
    userLi.remove();
    answerLi.remove();
    el.emptyChat.hidden = el.messageList.children.length > 0;
    el.input.value = text;
    autosize();
    state.stream = null;
    setStreaming(false);
    showNotice(error);
  }
}

function connect(stream, endpoint) {
  const url = new URL(endpoint, location.origin);
  if (stream.lastId) url.searchParams.set("last_event_id", String(stream.lastId));
  const es = new EventSource(url);
  stream.es = es;
  es.addEventListener("open", () => {
    stream.retries = 0;
    setStreamStatus("");
  });
  es.addEventListener("message", (event) => {
    if (event.lastEventId) stream.lastId = Number(event.lastEventId);
    if (event.data === "[DONE]") return finish(stream);
    const data = JSON.parse(event.data);
    if (data.restart) stream.text = ""; // a retry of the turn begins: what came before is void
    stream.text += data.token;
    if (data.done) stream.done = data;
    paint(stream);
  });
  es.addEventListener("error", (event) => {
    if (event.data) {
      // The job's own `event: error`: it failed or was cancelled.
      const data = JSON.parse(event.data);
      return finish(stream, { failed: data.error || "the answer failed" });
    }
    // The connection dropped, or a reopen was refused (an expired ticket): resume with a fresh ticket.
    es.close();
    if (!stream.finished && !stream.stopped) resume(stream);
  });
}

async function resume(stream) {
  if (stream.resuming) return;
  stream.resuming = true;
  setStreamStatus("Connection lost. Reconnecting…");
  let delay = 500;
  while (!stream.finished && !stream.stopped && state.stream === stream) {
    if (!navigator.onLine) await onlineOrTimeout(5000);
    try {
      const ticket = await api("POST", `/stream/${encodeURIComponent(stream.cid)}/ticket`);
      if (stream.finished || stream.stopped) break;
      stream.resuming = false;
      setStreamStatus("Reconnected. Resuming the answer…");
      connect(stream, ticket.stream_endpoint);
      return;
    } catch (error) {
      if (error.status && error.status !== 429 && error.status < 500) {
        stream.resuming = false;
        return finish(stream, { failed: error.message });
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 5000);
    }
  }
  stream.resuming = false;
}

function onlineOrTimeout(ms) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      window.removeEventListener("online", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    window.addEventListener("online", done);
  });
}

// Render at most once a frame, however fast tokens come; follow the answer unless the reader scrolled up.
function paint(stream) {
  if (stream.frame) return;
  stream.frame = requestAnimationFrame(() => {
    stream.frame = 0;
    const follow = nearBottom();
    setContent(stream.li, "assistant", stream.text);
    if (follow) scrollToBottom();
  });
}

function finish(stream, { failed = null, stopped = false } = {}) {
  if (stream.finished) return;
  stream.finished = true;
  stream.es?.close();
  cancelAnimationFrame(stream.frame);
  const li = stream.li;
  li.classList.remove("streaming");
  setContent(li, "assistant", stream.text);
  addCopyButtons(li);
  li.dataset.correlationId = stream.cid || "";
  if (failed) {
    li.classList.add("failed");
    setMeta(li, `The answer failed: ${failed}`);
  } else if (stopped) {
    li.classList.add("stopped");
    setMeta(li, "Stopped");
  } else {
    const done = stream.done || {};
    setMeta(li, answerMeta(el.model.value, done.processing_time));
    li.dataset.finishReason = done.finish_reason || "";
  }
  if (state.stream === stream) {
    state.stream = null;
    setStreaming(false);
  }
  setStreamStatus("");
  if (nearBottom()) scrollToBottom();
  loadConversations({ reset: true });
}

function stopStreaming({ cancel }) {
  const stream = state.stream;
  if (!stream) return;
  stream.stopped = true;
  stream.es?.close();
  if (cancel && stream.cid) cancelTurn(stream);
  finish(stream, { stopped: true });
}

async function cancelTurn(stream) {
  try {
    await api("DELETE", `/stream/${encodeURIComponent(stream.cid)}`);
  } catch (error) {
    showNotice(error);
  }
}

function setStreaming(on) {
  el.send.hidden = on;
  el.stop.hidden = !on;
  if (on) el.stop.focus({ preventScroll: true });
  else if (document.activeElement === el.stop || document.activeElement === document.body) el.input.focus();
}

function autosize() {
  el.input.style.height = "auto";
  el.input.style.height = `${Math.min(el.input.scrollHeight + 2, window.innerHeight * 0.4)}px`;
}

// --- the drawer (narrow screens) ----------------------------------------------------------------------------

function openDrawer() {
  el.app.classList.add("drawer-open");
  el.scrim.hidden = false;
}

function closeDrawer() {
  el.app.classList.remove("drawer-open");
  el.scrim.hidden = true;
}

// --- wiring -------------------------------------------------------------------------------------------------

el.signinForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = el.keyInput.value.trim();
  if (!key) return showSignin("Paste an API key first.");
  signIn(key);
});
el.signOut.addEventListener("click", signOut);
el.userForm.addEventListener("submit", (e) => {
  e.preventDefault();
  if (!state.me?.may_act_for_any_user) return;
  // Another user's conversations: the one open (in the address) was the previous user's.
  if (state.userId && state.userId !== el.userId.value.trim()) history.replaceState(null, "", location.pathname);
  actAs(el.userId.value);
});
el.newChat.addEventListener("click", newChat);
el.openSidebar.addEventListener("click", openDrawer);
el.closeSidebar.addEventListener("click", closeDrawer);
el.scrim.addEventListener("click", closeDrawer);
el.noticeClose.addEventListener("click", hideNotice);
el.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = el.input.value.trim();
  if (text) send(text);
});
el.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    el.composer.requestSubmit();
  }
});
el.input.addEventListener("input", autosize);
el.stop.addEventListener("click", () => stopStreaming({ cancel: true }));
el.model.addEventListener("change", savePrefs);
el.maxTokens.addEventListener("change", savePrefs);
el.temperature.addEventListener("input", () => {
  el.temperatureValue.textContent = el.temperature.value;
  savePrefs();
});
window.addEventListener("hashchange", () => {
  const id = conversationFromHash();
  if (id && id !== state.current && state.userId) openConversation(id);
});
window.addEventListener("offline", () => {
  if (state.stream) setStreamStatus("You are offline. The answer resumes when the connection is back.");
});
new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting)) loadOlder();
}, { root: el.messages, rootMargin: "200px 0px 0px 0px" }).observe(el.historyTop);
new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting)) loadConversations();
}, { root: el.sidebar.querySelector(".conversation-nav"), rootMargin: "0px 0px 200px 0px" }).observe(
  el.conversationsMore,
);

const saved = prefs();
if (saved.maxTokens) el.maxTokens.value = saved.maxTokens;
if (saved.temperature) el.temperature.value = saved.temperature;
el.temperatureValue.textContent = el.temperature.value;

const rememberedKey = sessionStorage.getItem(KEY_STORAGE);
if (rememberedKey) signIn(rememberedKey, { remembered: true });
else showSignin("");

// Every visible string, in English and Dutch: the texts live in one module
// per part of the product (i18n_*.js), the machinery here. The language comes
// from the visitor's choice (kept in localStorage), else from the browser,
// else English. Elements carry data-i18n="key" (text, with its {name} values
// in data-i18n-vars), data-i18n-aria="key" (aria-label) or data-i18n-alt="key"
// (alt): translatePage() renders them all again when the language changes.
import { MESSAGES as APP } from "./i18n_app.js";
import { MESSAGES as CALL } from "./i18n_call.js";
import { MESSAGES as COMMON } from "./i18n_common.js";
import { MESSAGES as SUPPORT } from "./i18n_support.js";

function merged(parts) {
  const all = {};
  for (const part of parts) {
    for (const [code, texts] of Object.entries(part)) all[code] = { ...all[code], ...texts };
  }
  return all;
}

const MESSAGES = merged([COMMON, APP, CALL, SUPPORT]);

export const LANGUAGES = { en: "English", nl: "Nederlands" };
const STORAGE_KEY = "videoconsult.language";
// The event on ``document`` after the page has changed its language.
export const LANGUAGE_CHANGED = "videoconsult-language";

function pick() {
  const saved = localStorage.getItem(STORAGE_KEY);
  if (saved && MESSAGES[saved]) return saved;
  for (const tag of navigator.languages || [navigator.language || "en"]) {
    const base = tag.toLowerCase().split("-")[0];
    if (MESSAGES[base]) return base;
  }
  return "en";
}

let current = pick();

export function language() {
  return current;
}

// The text of ``key`` in the current language, with {name} filled in.
export function t(key, vars = {}, fallback = undefined) {
  let text = MESSAGES[current][key];
  if (text === undefined) text = MESSAGES.en[key];
  if (text === undefined) {
    if (fallback !== undefined) return fallback;
    console.warn("untranslated", key);
    return key;
  }
  return text.replace(/\{(\w+)\}/g, (match, name) => (name in vars ? String(vars[name]) : match));
}

// Show the text of ``key`` in ``element`` and keep the key, so that a change
// of language renders it again (a message already on screen included).
// Without a key the element is emptied. ``fallback``: see t().
export function say(element, key, vars = {}, fallback = undefined) {
  if (!key) {
    delete element.dataset.i18n;
    delete element.dataset.i18nVars;
    delete element.dataset.i18nFallback;
    element.textContent = "";
    return;
  }
  element.dataset.i18n = key;
  if (Object.keys(vars).length) element.dataset.i18nVars = JSON.stringify(vars);
  else delete element.dataset.i18nVars;
  if (fallback !== undefined) element.dataset.i18nFallback = fallback;
  else delete element.dataset.i18nFallback;
  element.textContent = t(key, vars, fallback);
}

function render(element) {
  const vars = element.dataset.i18nVars ? JSON.parse(element.dataset.i18nVars) : {};
  element.textContent = t(element.dataset.i18n, vars, element.dataset.i18nFallback);
}

export function translatePage(root = document) {
  document.documentElement.lang = current;
  for (const element of root.querySelectorAll("[data-i18n]")) render(element);
  for (const element of root.querySelectorAll("[data-i18n-aria]")) {
    element.setAttribute("aria-label", t(element.dataset.i18nAria));
  }
  for (const element of root.querySelectorAll("[data-i18n-alt]")) {
    element.setAttribute("alt", t(element.dataset.i18nAlt));
  }
  const title = document.querySelector("title[data-i18n]");
  if (title) document.title = t(title.dataset.i18n);
}

// The language <select>: filled, set, and switching the page when changed.
export function setupLanguage(select, onChange) {
  select.replaceChildren();
  for (const [code, name] of Object.entries(LANGUAGES)) {
    const option = document.createElement("option");
    option.value = code;
    option.textContent = name;
    option.lang = code;
    option.selected = code === current;
    select.append(option);
  }
  select.addEventListener("change", () => {
    current = MESSAGES[select.value] ? select.value : "en";
    localStorage.setItem(STORAGE_KEY, current);
    onChange();
    // For what a shared module put on the page (session.js: the notices).
    document.dispatchEvent(new Event(LANGUAGE_CHANGED));
  });
}

// The browser's own locale where it speaks the page's language (en-GB: a
// 24-hour clock), else the page's language.
export function locale() {
  for (const tag of navigator.languages || [navigator.language || current]) {
    if (tag.toLowerCase().split("-")[0] === current) return tag;
  }
  return current;
}

export function formatTime(iso, withDate = false) {
  const options = withDate
    ? { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" }
    : { hour: "2-digit", minute: "2-digit" };
  return new Intl.DateTimeFormat(locale(), options).format(new Date(iso));
}

export function formatDuration(seconds) {
  const minutes = Math.floor(seconds / 60);
  const rest = seconds % 60;
  return `${minutes}:${String(rest).padStart(2, "0")}`;
}

// For tests: every key of every language.
export const _messages = MESSAGES;

// More strings from a page's own module (i18n_admin.js): added to each language.
export function addMessages(extra) {
  for (const [code, texts] of Object.entries(extra)) Object.assign(MESSAGES[code], texts);
}

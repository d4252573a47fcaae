// The therapist's consults list at /app: the rows by day with each consult's
// buttons, drawn anew without losing the keyboard's place.
import { consultTime, groupByTime } from "./appointments.js";
import { formatDuration, formatTime, say, t } from "./i18n.js";

// What a consult's row says when its link does not work (the list's "link").
const LINK_NOTES = { revoked: "app.list.revoked", expired: "app.list.linkExpired", none: "app.list.noLink" };

function statusLabel(status) {
  return t(`status.${status}`);
}

// The consults in ``groups`` by day (``empty`` says when there are none); each
// row's buttons call ``actions`` (open, newLink, mailLink, revoke, end) with
// its consult.
export function renderConsults(groups, empty, consults, actions) {
  // The keyboard's place, to find again in the rows drawn anew.
  const focused = groups.contains(document.activeElement) ? document.activeElement : null;
  groups.replaceChildren();
  empty.hidden = consults.length > 0;
  if (!consults.length) say(empty, "app.list.empty");
  const today = new Date().toDateString();
  for (const [titleKey, items] of groupByTime(consults)) {
    if (!items.length) continue;
    const heading = document.createElement("h3");
    heading.textContent = t(titleKey);
    const table = document.createElement("table");
    table.className = "consults";
    const head = table.createTHead().insertRow();
    for (const key of ["app.list.time", "app.list.name", "app.list.status", "app.list.duration", "app.list.actions"]) {
      const cell = document.createElement("th");
      cell.scope = "col";
      cell.textContent = t(key);
      head.append(cell);
    }
    const body = table.createTBody();
    for (const consult of items) {
      const row = body.insertRow();
      row.dataset.consult = consult.id;
      const when = consultTime(consult);
      row.insertCell().textContent = formatTime(when.toISOString(), when.toDateString() !== today);
      row.insertCell().textContent = consult.display_name || "—";
      const status = row.insertCell();
      status.textContent = statusLabel(consult.status);
      status.className = `status status-${consult.status}`;
      row.insertCell().textContent = consult.duration_s === null ? "" : formatDuration(consult.duration_s);
      const cell = row.insertCell();
      cell.className = "row-actions";
      const open = consult.status === "created" || consult.status === "active";
      if (open && LINK_NOTES[consult.link]) {
        const note = document.createElement("span");
        note.className = `link-${consult.link}`;
        note.textContent = ` · ${t(LINK_NOTES[consult.link])}`;
        status.append(note);
      }
      if (open) {
        cell.append(
          button("app.list.open", () => actions.open(consult)),
          button("app.list.newLink", () => actions.newLink(consult), "secondary"),
          button("app.list.mailLink", () => actions.mailLink(consult), "secondary"),
        );
        if (consult.link === "live") {
          cell.append(button("app.list.revoke", () => actions.revoke(consult), "secondary"));
        }
        cell.append(button("app.list.end", () => actions.end(consult), "danger"));
      }
    }
    groups.append(heading, table);
  }
  if (focused) focusAgain(groups, focused);
}

// After the list was drawn anew: the focus on the same button of the same
// consult's row, or on that row's first button (a revoked link's button is
// gone), or on the list itself, never back at the top of the page.
function focusAgain(groups, focused) {
  const row = focused.closest("tr[data-consult]");
  const again = row && groups.querySelector(`tr[data-consult="${CSS.escape(row.dataset.consult)}"]`);
  const target =
    (again && (again.querySelector(`button[data-action="${focused.dataset.action}"]`) || again.querySelector("button"))) ||
    groups;
  target.focus();
}

function button(key, action, kind = "") {
  const element = document.createElement("button");
  element.type = "button";
  element.className = `small ${kind}`.trim();
  element.textContent = t(key);
  element.dataset.action = key;
  element.addEventListener("click", action);
  return element;
}

// Each role's own page, and the way there from a page of another role.
import { LANGUAGE_CHANGED, t } from "./i18n.js";
import "./i18n_admin.js";

export const HOME = { therapist: "/app", support: "/support", admin: "/admin" };
const PAGE_NAMES = {
  therapist: "home.therapist",
  support: "home.support",
  admin: "home.admin",
};

// Fill ``element`` with where this account's own page is, as a link (again
// in another language when the page changes it).
export function showWayHome(element, role) {
  element.dataset.wayHome = role;
  element.replaceChildren();
  if (!HOME[role]) return;
  element.append(t("home.yours"), " ");
  const link = document.createElement("a");
  link.href = HOME[role];
  link.textContent = t(PAGE_NAMES[role]);
  element.append(link);
}

document.addEventListener(LANGUAGE_CHANGED, () => {
  for (const element of document.querySelectorAll("[data-way-home]")) showWayHome(element, element.dataset.wayHome);
});
